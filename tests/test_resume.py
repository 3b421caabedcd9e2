"""Crash safety: epoch checkpoints, exact resume (also after SIGKILL), non-finite losses,
damaged checkpoints and a full disk. Each failure keeps the last good checkpoint and says
what to do in one line."""
import dataclasses
import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

import models
import run as cli
from jaxprune import config, runner
from jaxprune.errors import UserError
from jaxprune.train import Data, Diverged, Journal, Trainer, fetch, fit, make_mesh
from jaxprune.train.checkpoint import Checkpoints, TrainCheckpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
    cfg = config.load(None, ["data.batch_size=64", "data.image_size=16", "train.epochs=3",
                             "train.lr=0.05"])
    mesh = make_mesh()
    return cfg, mesh, Data(cfg, mesh)


def _trainer(setup, lr=None, width=4):
    cfg, mesh, data = setup
    train = cfg.train if lr is None else dataclasses.replace(cfg.train, lr=lr)
    m = models.create("resnet18_cifar", num_classes=10, width=width, seed=0)
    t = Trainer(m, train, steps_per_epoch=data.steps_per_epoch(), mesh=mesh)
    t.start_round()
    return t


def _same_params(a: Trainer, b: Trainer) -> bool:
    return all(np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(fetch(a.params)), jax.tree.leaves(fetch(b.params))))


def _log(run_dir):
    return [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_crash_between_log_and_checkpoint_resumes_exactly(setup, tmp_path, untimed,
                                                            dies_at_epoch_checkpoint):
    """Epoch 2 is logged, then the process dies before its checkpoint lands. The rerun
    drops that line, trains epoch 2 again from epoch 1's checkpoint and ends bit-identical
    to a run that was never interrupted, with every epoch logged once."""
    data = setup[2]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    whole = _trainer(setup)
    expected = fit(whole, data, 3, journal=Journal(tmp_path / "a"), tag={"round": 1})

    with dies_at_epoch_checkpoint(2), pytest.raises(KeyboardInterrupt):
        fit(_trainer(setup), data, 3, journal=Journal(tmp_path / "b"), tag={"round": 1})
    assert [r["epoch"] for r in _log(tmp_path / "b")] == [1, 2]  # epoch 2 logged, not saved
    meta = TrainCheckpoints(tmp_path / "b" / "checkpoints" / "train").latest_meta()
    assert meta["data"] == {"epoch": 1, "batch": 0} and meta["log_lines"] == 1

    resumed = _trainer(setup)  # a fresh process would build this from scratch
    got = fit(resumed, data, 3, journal=Journal(tmp_path / "b"), tag={"round": 1})
    assert untimed(got) == untimed(expected)
    assert _same_params(resumed, whole)
    assert [r["epoch"] for r in _log(tmp_path / "b")] == [1, 2, 3]
    assert untimed(_log(tmp_path / "b")) == untimed(_log(tmp_path / "a"))
    # the last two epochs are kept; older ones are deleted once a newer one is complete
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints" / "train").iterdir()) == [
        "epoch_000002", "epoch_000003"]


def test_another_training_does_not_pick_up_the_checkpoint(setup, tmp_path):
    data = setup[2]
    journal = Journal(tmp_path)
    fit(_trainer(setup), data, 1, journal=journal, tag={"round": 0})
    fresh = _trainer(setup)
    before = fetch(fresh.params)
    # another tag (the next round) starts from the trainer's own state, not the checkpoint
    assert journal.resume(fresh, {"round": 1}, 1) == ([], False)
    assert all(np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(before), jax.tree.leaves(fetch(fresh.params))))


def test_checkpoint_of_another_model_is_refused(setup, tmp_path):
    data = setup[2]
    fit(_trainer(setup), data, 1, journal=Journal(tmp_path), tag={"round": 0})
    wider = _trainer(setup, width=8)
    with pytest.raises(UserError, match=r"epoch_000001: '.*' has shape .*another model.*delete"):
        fit(wider, data, 1, journal=Journal(tmp_path), tag={"round": 0})


def test_truncated_checkpoint_is_named_with_the_fix(setup, tmp_path):
    data = setup[2]
    fit(_trainer(setup), data, 1, journal=Journal(tmp_path), tag={"round": 0})
    folder = tmp_path / "checkpoints" / "train" / "epoch_000001"
    chunks = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
    biggest = max(chunks, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(UserError, match=r"epoch_000001 is damaged or truncated .*delete that "
                                        r"folder and run the same command again"):
        fit(_trainer(setup), data, 1, journal=Journal(tmp_path), tag={"round": 0})


def test_nonfinite_loss_names_epoch_and_step_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    data = setup[2]
    journal = Journal(tmp_path)
    fit(_trainer(setup), data, 1, journal=journal, tag={"round": 0})
    good = journal.checkpoints.latest_path()
    with pytest.raises(Diverged) as e:
        fit(_trainer(setup, lr=1e30), data, 2, journal=journal, tag={"round": 1})
    message = str(e.value)
    assert "non-finite training loss in round 1, epoch 1/2, step " in message
    assert f"the last good checkpoint {good} is kept" in message and "train.lr" in message
    step = e.value.record["step"]
    assert 1 <= step <= data.steps_per_epoch()
    assert journal.checkpoints.latest_path() == good
    # the kept checkpoint is whole and finite
    probe = _trainer(setup)
    journal.checkpoints.restore(probe)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(fetch(probe.params)))
    assert [r["round"] for r in _log(tmp_path)] == [0]  # nothing logged for the bad epoch


def _disk_full_after(nbytes):
    """Writes past `nbytes` per file fail with EFBIG, as writes on a full disk fail."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[0][1]))
    return old


def _disk_free(old):
    resource.setrlimit(resource.RLIMIT_FSIZE, old[0])
    signal.signal(signal.SIGXFSZ, old[1])


# orbax's writer thread outlives the failed write and complains at exit; the failure itself is
# what this test checks
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_full_disk_keeps_the_previous_checkpoint(setup, tmp_path):
    trainer = _trainer(setup)
    epochs = TrainCheckpoints(tmp_path / "train")
    rounds = Checkpoints(tmp_path / "rounds")
    first = epochs.save(trainer, {"epoch": 1})
    rounds.save(0, trainer.sync_model(), {"round": 0})
    old = _disk_full_after(4096)  # the model's tensors need more than that
    try:
        with pytest.raises(UserError, match=rf"could not write checkpoint .*epoch_000002 .*File "
                                            rf"too large.*the previous checkpoint {first} is intact"):
            epochs.save(trainer, {"epoch": 2})
        with pytest.raises(UserError, match=r"could not write checkpoint .*round_001 .*the "
                                            r"previous checkpoint .*round_000 is intact"):
            rounds.save(1, trainer.model, {"round": 1})
    finally:
        _disk_free(old)
    assert list((tmp_path / "train").glob("*tmp*"))  # what the failed write left behind:
    fresh = TrainCheckpoints(tmp_path / "train")   # never taken for a checkpoint
    assert fresh.latest_path() == first and fresh.latest_meta()["epoch"] == 1
    probe = _trainer(setup)
    fresh.restore(probe)
    assert _same_params(probe, trainer)
    assert Checkpoints(tmp_path / "rounds").rounds() == [0]


# -- through run.py ----------------------------------------------------------------------------

SMALL = {"name": "small", "seed": 0,
         "model": {"name": "resnet18_cifar", "options": {"width": 4}},
         "data": {"name": "digits", "batch_size": 64, "image_size": 16},
         "train": {"epochs": 2, "lr": 0.05, "schedule": "cosine"},
         "method": {"name": "easier", "max_rounds": 2, "acc_budget": 100.0,
                    "merge_cost": "none", "latency": False}}


def _config(tmp_path, **changes) -> Path:
    raw = json.loads(json.dumps(SMALL))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = raw
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _last_line(err: str) -> str:
    lines = [s for s in err.replace("\r", "\n").splitlines() if s.strip()]
    return lines[-1]


def test_full_disk_during_a_run_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    real = ocp.CheckpointManager.save
    calls = []

    def full_on_fourth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # round 0's two epochs and its model landed; round 1's epoch 1 fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, "save", full_on_fourth)
    code = cli.main(["--config", str(_config(tmp_path)), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = _last_line(err)
    assert line.startswith("error: could not write checkpoint ") and "No space left" in line
    assert "epoch_000002 is intact" in line and "run the same command again to resume" in line
    run_dir = tmp_path / "runs" / "small"
    assert TrainCheckpoints(run_dir / "checkpoints" / "train").latest_meta()["epochs"] == 2
    assert not (run_dir / "results.json").exists()


def test_nonfinite_loss_in_round_0_exits_2_and_the_report_says_so(tmp_path, capsys):
    code = cli.main(["--config", str(_config(tmp_path, train__lr=1e30)),
                     "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = _last_line(err)
    assert line.startswith("error: non-finite training loss in round 0, epoch 1/2, step ")
    report = (tmp_path / "runs" / "small" / "report.md").read_text()
    assert "# Run stopped" in report and "non-finite training loss in round 0" in report
    assert not (tmp_path / "runs" / "small" / "results.json").exists()


def test_nonfinite_loss_in_a_later_round_ends_the_search_with_the_rounds_before(
        tmp_path, monkeypatch):
    """Round 1 is made to diverge (its weights are NaN when it starts); the real check
    in the train step finds it, round 0 is selected and the report records it."""
    from jaxprune.methods.easier import method as easier
    real_fit = easier.fit

    def poisoned_round_1(trainer, data, epochs, **kw):
        if kw["tag"] == {"round": 1}:
            trainer.params = jax.tree.map(lambda x: x * np.float32(np.nan), trainer.params)
        return real_fit(trainer, data, epochs, **kw)
    monkeypatch.setattr(easier, "fit", poisoned_round_1)
    cfg = config.load(_config(tmp_path), [f"out={tmp_path / 'runs'}"])
    run_dir, results = runner.run(cfg)
    assert [r["round"] for r in results["rounds"]] == [0]
    assert results["selected"]["round"] == 0
    d = results["diverged"]
    assert (d["tag"], d["epoch"], d["step"]) == ({"round": 1}, 1, 1)
    assert results["selected"]["stop"] == "round 1 diverged (non-finite loss in epoch 1, step 1)"
    report = (run_dir / "report.md").read_text()
    assert "## Diverged" in report and "non-finite training loss in round 1" in report
    assert Checkpoints(run_dir / "checkpoints" / "rounds").rounds() == [0]


def _run_py(args, cwd=ROOT, **env):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", **env}
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *map(str, args)], env=env,
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# What the libraries a run uses keep for themselves outside the run folder: matplotlib's font
# cache and config folder, torch's compile cache folder. Nothing else may appear.
LIBRARY_CACHES = (".cache/matplotlib", ".config/matplotlib", "torchinductor_")


def _written_outside(roots: dict[str, Path], run_dir: Path) -> list[str]:
    found = []
    for name, root in roots.items():
        for p in root.rglob("*"):
            rel = str(p.relative_to(root))
            if p.is_file() and not p.is_relative_to(run_dir) and not any(
                    rel.startswith(c) or f"/{c}" in f"/{rel}" for c in LIBRARY_CACHES):
                found.append(f"{name}/{rel}")
    return found


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_rerun_gives_the_same_results(tmp_path, untimed):
    """A run killed with SIGKILL at a random moment after its first epoch checkpoint, then
    run again with the same command, ends with the results.json of an uninterrupted run
    (CPU, same seed): accuracies, entropies, selected round, merge and export checks.
    The uninterrupted run, started from an empty folder with its own home and temporary
    folder, writes nothing outside its run folder but the libraries' caches."""
    cfg = _config(tmp_path)
    roots = {name: tmp_path / name for name in ("home", "tmp", "cwd")}
    for root in roots.values():
        root.mkdir()
    whole, cut = roots["cwd"] / "runs", tmp_path / "cut"

    def first_checkpoint(p, out):  # seconds until the run's first epoch checkpoint exists
        train, t0 = out / "small" / "checkpoints" / "train", time.time()
        while not (train.is_dir() and TrainCheckpoints(train).latest_path()):
            if p.poll() is not None or time.time() - t0 > 300:
                p.kill()
                pytest.fail(f"no epoch checkpoint appeared: {p.communicate()[1][-3000:]}")
            time.sleep(0.2)
        return time.time()

    p = _run_py(["--config", cfg], cwd=roots["cwd"], HOME=str(roots["home"]),
                TMPDIR=str(roots["tmp"]))  # out: runs, in the working folder
    t1 = first_checkpoint(p, whole)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    rest = time.time() - t1
    assert _written_outside(roots, whole / "small") == []

    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.0, 0.8 * rest)
    p = _run_py(["--config", cfg, "--out", cut])
    first_checkpoint(p, cut)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    where = f"killed {delay:.1f} s after the first checkpoint (seed {seed})"
    assert p.returncode == -signal.SIGKILL and not (cut / "small" / "results.json").exists(), where

    p = _run_py(["--config", cfg, "--out", cut])
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert "resuming" in out, out
    expected = json.loads((whole / "small" / "results.json").read_text())
    got = json.loads((cut / "small" / "results.json").read_text())
    assert untimed(got, cut) == untimed(expected, "runs"), where  # it ran with out: runs
    log = _log(cut / "small")
    assert [(r["round"], r["epoch"]) for r in log] == [(r, e) for r in range(3) for e in (1, 2)]
    assert untimed(log) == untimed(_log(whole / "small"))

