"""The trainer: torch-equivalent optimizers, one compiled step across rounds,
the same numbers on 1 and 4 devices, masked evaluation, the epoch loop's log."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxprune
import models
from jaxprune.config import TrainConfig
from jaxprune.methods.easier.method import EntropyHooks
from jaxprune.train import Trainer, make_mesh, make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def _global(mesh, x, y, mask=None):
    sh = NamedSharding(mesh, P("data"))
    batch = {"image": x, "label": y, "mask": np.ones(len(y), np.float32) if mask is None else mask}
    return {k: jax.device_put(v, sh) for k, v in batch.items()}


def _batch(rng, n, size=16, classes=10):
    return (rng.normal(size=(n, size, size, 3)).astype(np.float32),
            rng.integers(0, classes, size=n).astype(np.int32))


@pytest.mark.parametrize("cfg", [
    TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2, schedule="step",
                milestones=[2, 4], gamma=0.1, epochs=6),
    TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
                schedule="constant", epochs=6),
    TrainConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, schedule="constant", epochs=6),
], ids=["sgd-step", "sgd-nesterov", "adam"])
def test_optimizer_matches_torch(cfg):
    """make_optimizer's updates equal torch.optim (+ MultiStepLR stepped per epoch)."""
    steps_per_epoch = 3
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    xs = rng.normal(size=(cfg.epochs * steps_per_epoch, 8, 5)).astype(np.float32)

    def loss_np(w, x):
        return jnp.mean(jnp.square(x @ w - 1.0))

    tx, _ = make_optimizer(cfg, steps_per_epoch)
    w, state = jnp.asarray(w0), tx.init(jnp.asarray(w0))
    for x in xs:
        g = jax.grad(loss_np)(w, x)
        updates, state = tx.update(g, state, w)
        w = optax.apply_updates(w, updates)

    tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD([tw], lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam([tw], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = (torch.optim.lr_scheduler.MultiStepLR(opt, cfg.milestones, cfg.gamma)
             if cfg.schedule == "step" else None)
    for i, x in enumerate(xs):
        opt.zero_grad()
        torch.mean(torch.square(torch.from_numpy(x) @ tw - 1.0)).backward()
        opt.step()
        if sched is not None and (i + 1) % steps_per_epoch == 0:
            sched.step()
    np.testing.assert_allclose(np.asarray(w), tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_bad_optimizer_options_are_user_errors():
    """Refused when the config is read, before an optimizer is made."""
    from jaxprune import config
    with pytest.raises(jaxprune.UserError, match=r"config key 'train.lr' must be > 0, got 0.0"):
        config.from_dict({"train": {"lr": 0.0}})
    with pytest.raises(jaxprune.UserError, match=r"config key 'train.milestones\[0\]' must be >= 1"):
        config.from_dict({"train": {"milestones": [0, 5]}})


@pytest.fixture(scope="module")
def tiny():
    m = models.create("resnet18_cifar", num_classes=10, width=4)
    mesh = make_mesh()
    trainer = Trainer(m, TrainConfig(lr=0.05, milestones=[1]), steps_per_epoch=2, mesh=mesh,
                      hooks=EntropyHooks())
    return m, mesh, trainer


def test_rounds_reuse_one_compiled_step(tiny):
    """Linearizing sites and restarting the optimizer change state only: no retrace,
    and the compiled steps see the new masks."""
    m, mesh, trainer = tiny
    rng = np.random.default_rng(1)
    x, y = _batch(rng, 8)
    trainer.start_round()
    for _ in range(2):
        trainer.train_step(_global(mesh, x, y))
    first = trainer.finish_epoch()
    trainer.sync_model()
    jaxprune.linearize(m, ["layer1.0.relu1", "layer3.1.relu2"])
    trainer.start_round()
    trainer.train_step(_global(mesh, x, y))
    second = trainer.finish_epoch()
    evaluated = trainer.evaluate([_global(mesh, x, y)])
    # every test of this module feeds `tiny` the same shapes: one trace each, ever
    assert trainer.traces == {"train": 1, "eval": 1}
    assert first["examples"] == 16 and second["examples"] == 8
    # the mask change reached the device state and the compiled eval step
    trainer.sync_model()
    assert jaxprune.linearized(m) == ["layer1.0.relu1", "layer3.1.relu2"]
    m.eval()
    logits = m(x)
    m.train()
    expect = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)))
    assert evaluated["loss"] == pytest.approx(expect, rel=1e-5)
    # fresh optimizer: the schedule is back at its first value after start_round
    assert float(trainer.schedule(0)) == pytest.approx(0.05)


def test_train_step_entropy_is_site_entropy(tiny):
    """The statistics the step accumulates are exactly `site_entropy` of the batch."""
    m, mesh, trainer = tiny
    rng = np.random.default_rng(2)
    x, y = _batch(rng, 8)
    expect = jaxprune.site_entropy(m, x)
    trainer.start_round()
    trainer.train_step(_global(mesh, x, y))
    got = trainer.finish_epoch()["sites"]
    trainer.sync_model()
    assert list(got) == m.sites()
    np.testing.assert_allclose(list(got.values()), list(expect.values()), atol=1e-6)


def test_evaluate_weights_by_mask(tiny):
    """Padding rows (mask 0) do not count: a padded batch scores like the real rows alone."""
    m, mesh, trainer = tiny
    rng = np.random.default_rng(3)
    x, y = _batch(rng, 8)
    trainer.start_round()
    full = trainer.evaluate([_global(mesh, x[:6], y[:6])])
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    padded = trainer.evaluate([_global(mesh, x, y, mask)])
    assert padded["examples"] == 6
    assert padded["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert padded["acc"] == pytest.approx(full["acc"])


_DEVICES_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jaxprune, models
    from jaxprune.config import TrainConfig
    from jaxprune.methods.easier.method import EntropyHooks
    from jaxprune.train import Trainer, make_mesh
    m = models.create("resnet18_cifar", num_classes=10, width=4)
    mesh = make_mesh()
    trainer = Trainer(m, TrainConfig(lr=0.05, weight_decay=5e-4), steps_per_epoch=3, mesh=mesh,
                      hooks=EntropyHooks())
    trainer.start_round()
    rng = np.random.default_rng(0)
    sh = NamedSharding(mesh, P("data"))
    out = {"devices": len(jax.devices()), "loss": [], "entropy": []}
    for _ in range(3):
        x = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
        y = rng.integers(0, 10, size=8).astype(np.int32)
        batch = {k: jax.device_put(v, sh) for k, v in
                 {"image": x, "label": y, "mask": np.ones(8, np.float32)}.items()}
        trainer.train_step(batch)
        epoch = trainer.finish_epoch()   # one step per "epoch": per-step numbers
        out["loss"].append(epoch["loss"])
        out["entropy"].append(list(epoch["sites"].values()))
    trainer.sync_model()
    m.eval()
    out["logits"] = np.asarray(m(x)).tolist()
    print(json.dumps(out))
""")


def _run_on(devices: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_one_and_four_devices_agree():
    """Data parallelism changes nothing but speed: BatchNorm statistics, losses and
    entropies are global, so 1 and 4 devices give the same numbers."""
    one, four = _run_on(1), _run_on(4)
    assert (one["devices"], four["devices"]) == (1, 4)
    np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(four["entropy"], one["entropy"], atol=1e-6)
    # float32 sums in another order, through three steps: 1e-4 of the logits' scale
    scale = float(np.abs(one["logits"]).max())
    np.testing.assert_allclose(four["logits"], one["logits"], atol=1e-4 * scale)


def test_fit_logs_every_epoch(tmp_path):
    """`fit` on the embedded digits data: one metrics.jsonl line per epoch, the
    schedule's rate in it, and the model holds the trained state afterwards."""
    from jaxprune import config
    from jaxprune.train import Data, Journal, fit
    cfg = config.load(None, ["data.batch_size=64", "data.image_size=16", "train.epochs=2",
                             "train.milestones=[1]", "train.lr=0.05"])
    mesh = make_mesh()
    data = Data(cfg, mesh)
    m = models.create("resnet18_cifar", num_classes=data.info.num_classes, width=4)
    before = np.asarray(m.layers["fc"].kernel.get_value()).copy()
    trainer = Trainer(m, cfg.train, steps_per_epoch=data.steps_per_epoch(), mesh=mesh,
                      hooks=EntropyHooks())
    trainer.start_round()
    records = fit(trainer, data, 2, journal=Journal(tmp_path), tag={"round": 7})
    last = records[-1]
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["epoch"]) for r in lines] == [(7, 1), (7, 2)]
    assert [r["lr"] for r in lines] == pytest.approx([0.05, 0.005])
    assert lines == json.loads(json.dumps(records))
    assert set(lines[0]["entropy"]) == set(m.sites())
    assert 0 <= last["val_acc"] <= 100 and last["train_loss"] > 0
    assert not np.array_equal(np.asarray(m.layers["fc"].kernel.get_value()), before)
