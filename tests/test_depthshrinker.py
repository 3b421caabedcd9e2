"""DepthShrinker: the gate against torch's, hard top-k, the regularizer's direction,
progressive removal, the gate groups and the ReLU6 after removed blocks, cost tables,
config errors, and the small config end to end (its fused model equals the finetuned one)."""
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxprune
import models
from jaxprune import config
from jaxprune.config import TrainConfig
from jaxprune.methods.depthshrinker import LAT_AFTER, LAT_BEFORE, gates
from jaxprune.methods.depthshrinker.cost import cost_table
from jaxprune.methods.depthshrinker.groups import final_act_name, groups
from jaxprune.methods.depthshrinker.method import SearchHooks, apply_keep, progressive_keep
from jaxprune.train import Trainer, fetch, make_mesh
from models.layers import Act

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("s", [-0.3, 0.0, 0.45, 1.0, 1.2])
def test_clamp_gradient_is_torchs(s):
    """torch.clamp passes the gradient on the bounds too (jnp.clip would give 0.5 there)."""
    ts = torch.tensor(s, requires_grad=True)
    torch.clamp(ts, 0, 1).backward()
    value, grad = jax.value_and_grad(gates.clamp01)(jnp.float32(s))
    assert float(value) == pytest.approx(min(max(s, 0.0), 1.0))
    assert float(grad) == float(ts.grad)


@pytest.mark.parametrize("s", [0.0, 1.0, 0.6, -0.2, 1.4])
@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_gate_matches_torch(s, keep):
    """An Act site with `gate_masks` computes the released hard gate, value and gradients
    (w.r.t. the score and the input), as torch computes it."""
    rng = np.random.default_rng(0)
    x = (4 * rng.normal(size=(3, 4, 4, 5))).astype(np.float32)  # below 0 and above 6
    g = rng.normal(size=x.shape).astype(np.float32)              # an upstream gradient

    ts = torch.tensor(s, requires_grad=True)
    tx = torch.tensor(x, requires_grad=True)
    act = torch.nn.functional.relu6(tx)
    c = torch.clamp(ts, 0, 1)
    ty = act + (tx - act) * ((1 - keep) - c.detach() + c)
    (ty * torch.from_numpy(g)).sum().backward()

    def f(score, inp):
        site = Act("relu6")
        site.mask.set_value(gates.gate_masks(score, jnp.float32(keep)))
        y = site(inp)
        return jnp.sum(y * g), y

    (_, y), (gs, gx) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.float32(s), x)
    np.testing.assert_allclose(np.asarray(y), ty.detach().numpy(), atol=1e-6)
    assert float(gs) == pytest.approx(float(ts.grad), rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(np.asarray(gx), tx.grad.numpy(), atol=1e-6)


@pytest.mark.parametrize("ratio", [*gates.RATIOS, 0.0, 0.7, 1.0])
def test_top_k_keeps_floor_n_ratio_smallest(ratio):
    """Exactly floor(N * ratio) gates keep their activation: the smallest scores, ties
    to the earlier gate, the same traced or not."""
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=19), 1).astype(np.float32)  # rounding makes ties
    k = gates.keep_count(19, ratio)
    assert k == math.floor(19 * ratio)
    keep = np.asarray(jax.jit(gates.keep_smallest, static_argnums=1)(scores, k))
    expect = np.zeros(19, np.float32)
    expect[np.argsort(scores, kind="stable")[:k]] = 1
    np.testing.assert_array_equal(keep, expect)
    np.testing.assert_array_equal(np.asarray(gates.keep_smallest(scores, k)), expect)
    if ratio in gates.RATIOS:
        assert gates.keep_lists(scores)[f"{ratio:g}"] == expect.astype(int).tolist()


@pytest.mark.parametrize("sign,direction", [("reduce", 1.0), ("keep", -1.0)])
def test_regularizer_sign(sign, direction):
    """'reduce' raises the scores (towards removal) in proportion to Δ; 'keep' (the
    released sign) lowers them."""
    delta = np.asarray(LAT_BEFORE) - np.asarray(LAT_AFTER)
    grad = jax.grad(lambda s: gates.cost_penalty(s, delta, sign))(jnp.zeros(19))
    step = -0.01 * np.asarray(grad)  # one SGD step
    np.testing.assert_allclose(step, direction * 0.01 * delta, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    m = models.create("mobilenet_v2", num_classes=10, width_mult=0.35, dropout=0.0)
    return m, make_mesh()


def _batch(mesh, n=8, size=16, seed=0):
    rng = np.random.default_rng(seed)
    sh = NamedSharding(mesh, P("data"))
    b = {"image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
         "label": rng.integers(0, 10, n).astype(np.int32), "mask": np.ones(n, np.float32)}
    return {k: jax.device_put(v, sh) for k, v in b.items()}


def test_search_step_trains_scores_and_gates_masks(tiny):
    """Through the trainer: the cost term moves the scores its way (a large λ makes it
    dominate), every step applies hard top-k masks, the Gumbel scale changes without a
    retrace, and the synced model holds the masks of the last step's keep-list."""
    m, mesh = tiny
    m = nnx.clone(m)
    gs = groups(m)
    delta = np.asarray(LAT_BEFORE) - np.asarray(LAT_AFTER)
    hooks = SearchHooks(gs, gates.keep_count(19, 0.4), delta, weight=1.0, sign="reduce", seed=0)
    cfg = TrainConfig(lr=0.01, momentum=0.0, weight_decay=0.0, schedule="constant", epochs=1)
    trainer = Trainer(m, cfg, steps_per_epoch=3, mesh=mesh, hooks=hooks)
    trainer.start_round()
    for i in range(3):
        trainer.train_step(_batch(mesh, seed=i))
        trainer.set_aux(noise=np.float32(0.5 / (i + 1)))
    epoch = trainer.finish_epoch()
    assert trainer.traces["train"] == 1
    assert epoch["terms"]["cost"] > 0
    scores = fetch(trainer.extra)["scores"]
    big = delta > 10  # the cost gradient (λΔ) outweighs the loss's there
    assert (scores[big] > 0).all()
    assert scores[big] == pytest.approx(0.03 * delta[big], rel=0.2)
    trainer.sync_model()
    masks = np.array([float(m.layers[g.sites[0]].mask.get_value()) for g in gs])
    assert set(masks.tolist()) <= {0.0, 1.0} and masks.sum() == 7
    for g in gs:  # the shared gate switches both sites of a block
        assert len({float(m.layers[s].mask.get_value()) for s in g.sites}) == 1


def test_progressive_schedule():
    """The released rule: R removed gates, one more every until // (R-1) epochs, the
    first at epoch 0; 'forward' removes from the stem side, 'backward' from the head."""
    keep = np.ones(19, np.float32)
    keep[[2, 5, 9, 12]] = 0
    removed = lambda k: [i for i, v in enumerate(k) if v == 0]  # noqa: E731
    assert [removed(progressive_keep(keep, e, 6, "forward")) for e in (0, 1, 2, 4, 6, 30)] == [
        [2], [2], [2, 5], [2, 5, 9], [2, 5, 9, 12], [2, 5, 9, 12]]
    assert removed(progressive_keep(keep, 0, 6, "backward")) == [12]
    assert removed(progressive_keep(keep, 2, 6, "backward")) == [9, 12]
    one = np.ones(19, np.float32)
    one[3] = 0
    assert removed(progressive_keep(one, 0, 6, "forward")) == [3]


@pytest.mark.parametrize("layout", ["torchvision", "timm"])
def test_groups_and_final_act(layout):
    """19 gates (stem, DS block, 16 shared block gates, head); a removed inverted residual's
    ReLU6 reads its output (after the residual add) and feeds everything that read it; with
    its mask at 0 the model is unchanged."""
    m = models.create("mobilenet_v2", num_classes=10, width_mult=1.4, layout=layout, dropout=0.0)
    gs = groups(m)
    assert len(gs) == 19
    assert [len(g.sites) for g in gs] == [1, 1] + [2] * 16 + [1]
    assert [g.final is None for g in gs] == [True, True] + [False] * 16 + [True]
    assert sorted(s for g in gs for s in g.sites) == sorted(m.sites())
    adds = [g.final is not None and g.final.endswith(".add") for g in gs]
    residual = gs[next(i for i in range(18) if adds[i] and adds[i + 1])]  # the next one adds too
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    m.eval()
    before = np.asarray(m(x))
    name = m.insert_after(residual.final, final_act_name(residual), Act("relu6"))
    assert name.endswith(".final_act")
    readers = [n for n, ins in m.graph if residual.final in ins]
    assert readers == [name]
    assert sum(name in ins for _, ins in m.graph) == 2  # the next block and its residual add
    apply_keep(m, gs, {residual.index: name}, np.ones(19, np.float32))  # block kept: ReLU6 off
    np.testing.assert_allclose(np.asarray(m(x)), before, atol=1e-6)


def test_cost_tables():
    m = models.create("mobilenet_v2", num_classes=10, width_mult=0.35)
    given = cost_table("given", m, (32, 32), before=LAT_BEFORE, after=LAT_AFTER)
    assert given.delta[2] == pytest.approx(138.79 - 5.45)
    with pytest.raises(jaxprune.UserError, match="lat_before must have 19"):
        cost_table("given", m, (32, 32), before=[1, 2], after=LAT_AFTER)
    relu = cost_table("relu", m, (32, 32))
    # stem: 16 channels (32 * 0.35 -> 16) at 16x16; the first inverted residual expands the
    # DS block's 8 channels (16 * 0.35 -> 8) to 48 at 16x16, then a stride-2 depthwise conv
    assert relu.delta[0] == pytest.approx(16 * 16 * 16 / 1e3)
    assert relu.delta[2] == pytest.approx((48 * 16 * 16 + 48 * 8 * 8) / 1e3)
    with pytest.raises(jaxprune.UserError, match="method.cost"):
        cost_table("flops", m, (32, 32))


@pytest.mark.slow
def test_measured_cost_table():
    """Each group timed on this device, unfused with its activations vs fused without."""
    m = models.create("mobilenet_v2", num_classes=10, width_mult=0.35)
    t = cost_table("measured", m, (32, 32), repeats=3)
    assert t.kind == "measured" and len(t.before) == len(t.after) == 19
    assert all(v > 0 for v in t.before + t.after)


def _small_cfg(tmp_path, *overrides):
    return config.load(ROOT / "configs/depthshrinker/digits-small.yaml",
                       [f"out={tmp_path}", *overrides])


def test_config_errors(tmp_path):
    """Each key's range and the rules between keys when the config is read; what the model
    must have (blocks, one value per gate) when a run or a dry run checks it."""
    from jaxprune import preflight
    with pytest.raises(jaxprune.UserError, match=r"config key 'method.act_list\[2\]' must be one "
                                                 r"of \(0, 1\), got 2"):
        _small_cfg(tmp_path, "method.stage=finetune", "method.act_list=[1,0,2]")
    with pytest.raises(jaxprune.UserError, match="needs a keep-list"):
        _small_cfg(tmp_path, "method.stage=finetune")
    with pytest.raises(jaxprune.UserError, match=r"'method.cost_sign' must be one of "
                                                 r"\('reduce', 'keep'\), got 'up'"):
        _small_cfg(tmp_path, "method.cost_sign=up")
    with pytest.raises(jaxprune.UserError, match="progressive_epochs"):
        _small_cfg(tmp_path, "method.progressive=true", "method.progressive_epochs=9")
    c = _small_cfg(tmp_path, "model.name=resnet18_cifar", "model.options={}")
    with pytest.raises(jaxprune.UserError, match=r"inverted-residual networks: model.name must "
                                                 r"be one of \['efficientnet_lite0', "
                                                 r"'mobilenet_v2', 'mobilenet_v2_cifar'\]"):
        preflight.check(c)
    c = _small_cfg(tmp_path, "method.stage=finetune", "method.act_list=[1,0]")
    with pytest.raises(jaxprune.UserError, match=r"method.act_list has 2 values, mobilenet_v2 has "
                                                 r"19 gates: give one per gate$"):
        preflight.check(c)
    with pytest.raises(jaxprune.UserError, match="act_list must be 19"):
        gates.parse_keep_list([1, 0, 2] + [1] * 16, 19, "method.act_list")


def _log(run_dir):
    return [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]


SHORT = ["method.pretrain_epochs=1", "train.epochs=2", "method.gumbel_epochs=1",
         "method.progressive=true", "method.progressive_epochs=1", "method.latency=false"]


@pytest.mark.slow
def test_small_config_end_to_end(tmp_path, untimed, dies_at_epoch_checkpoint):
    """digits-small, shortened, with Gumbel exploration and progressive removal: both stages
    run, the keep-lists are written, the fused model computes the finetuned one's function
    with fewer layers, and the report is there. The same config killed in the search, after
    its first epoch's checkpoint, and run again, reports exactly the same."""
    from jaxprune import runner
    cfg = _small_cfg(tmp_path, *SHORT)
    run_dir, res = runner.run(cfg)
    lists = json.loads((run_dir / "keep_lists.json").read_text())["keep_lists"]
    assert {r: sum(v) for r, v in lists.items()} == {f"{r:g}": math.floor(19 * r)
                                                     for r in gates.RATIOS}
    ft = res["finetune"]
    assert sum(ft["keep"]) == 7 and ft["keep"] == lists["0.4"]
    assert len(ft["final_acts"]) == sum(1 for i in ft["removed_gates"] if 2 <= i <= 17)
    merge = res["merge"]
    assert merge["max_abs_diff"] < 1e-4
    assert merge["depth_after"] < merge["depth_before"]
    n_test = 270  # the digits test split
    assert abs(res["fused"]["test_acc"] - ft["test_acc"]) <= 100.0 / n_test + 1e-9
    for f in ("report.md", "results.json", "gate_scores.png", "pattern.png", "metrics.jsonl"):
        assert (run_dir / f).is_file(), f
    log = _log(run_dir)
    assert [r["removed"] for r in log if r["stage"] == "finetune"] == [1, 12]  # progressive
    cut = _small_cfg(tmp_path / "cut", *SHORT)
    with dies_at_epoch_checkpoint(3) as tags, pytest.raises(KeyboardInterrupt):
        runner.run(cut)
    assert tags == [{"stage": "dense"}, {"stage": "search"}, {"stage": "search"}]
    cut_dir, resumed = runner.run(cut)  # the search continues: scores, Gumbel noise, optimizer
    assert untimed(resumed, tmp_path / "cut") == untimed(res, tmp_path)
    assert untimed(_log(cut_dir)) == untimed(_log(run_dir))


# DESIGN.md §6: the published keep-lists for MobileNetV2-1.4 on ImageNet
PUBLISHED = {
    "A": "0,1,0,0,1,1,0,1,0,1,0,1,1,0,1,1,1,1,1", "B": "1,0,0,0,1,1,0,0,0,0,0,1,1,0,1,1,1,1,1",
    "C": "1,1,0,0,1,0,0,0,0,0,0,1,1,0,1,1,1,1,1", "D": "0,0,0,0,1,1,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "E": "0,1,0,0,1,0,0,0,0,0,0,0,0,0,1,1,1,1,1", "F": "1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1"}


@pytest.mark.parametrize("name", ["mbv2-140", "mbv2-100", "mbv2-140-snl",
                                  *[f"mbv2-140-{p}" for p in PUBLISHED]])
def test_imagenet_configs_mirror_the_seed(name, tmp_path):
    """The ImageNet configs: timm-layout MobileNetV2 from a weights file, the paper's recipe,
    the published keep-lists and the released latency tables."""
    cfg = config.load(ROOT / f"configs/depthshrinker/{name}.yaml", [f"out={tmp_path}"])
    assert cfg.data.name == "imagenet2012" and cfg.data.batch_size == 256
    assert cfg.model.options["layout"] == "timm" and cfg.model.pretrained.endswith(".pth")
    assert cfg.model.options["width_mult"] == (1.0 if name == "mbv2-100" else 1.4)
    if name.endswith("snl"):  # read and checked: exactly one budget
        assert cfg.method.relu_fraction == 0.4 and cfg.method.lam == 1e-5
        return
    t = cfg.train
    assert (t.epochs, t.lr, t.min_lr, t.weight_decay, t.grad_clip, t.label_smoothing) == (
        180, 0.1, 5e-6, 1e-5, 5.0, 0.1)
    assert t.nesterov and t.schedule == "cosine" and not t.weight_decay_1d
    pattern = name.rsplit("-", 1)[-1]
    if pattern in PUBLISHED:
        assert cfg.method.stage == "finetune" and cfg.method.distill
        assert ",".join(map(str, cfg.method.act_list)) == PUBLISHED[pattern]
    else:
        assert cfg.method.stage == "search" and cfg.method.ratio == 0.4
        if name == "mbv2-140":
            assert cfg.method.lat_before == list(LAT_BEFORE)
            assert cfg.method.lat_after == list(LAT_AFTER)
