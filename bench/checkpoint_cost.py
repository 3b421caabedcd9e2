"""What does the per-epoch checkpoint cost? Its save and restore time against one train step.

    python bench/checkpoint_cost.py [--arch resnet18 mobilenet_v2] [--batch 32] [--size 224]

For each model: the whole train state (weights, statistics, masks, optimizer state, step)
saved with `TrainCheckpoints` (orbax, synchronous, into a temporary folder) a few times and
restored once, against the median of a few jitted train steps at `--batch` x `--size` px,
timed in the same process. `save_in_steps` is the save time in train steps: an epoch of
more steps than that pays less than one step's worth per checkpoint. The last lines are one
JSON object per model.
"""
from __future__ import annotations

import os

# One XLA host device per core (DESIGN.md §2: one device does not keep two cores busy).
_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_cores}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
from jaxprune import config  # noqa: E402
from jaxprune.data import to_global  # noqa: E402
from jaxprune.train import Trainer, make_mesh  # noqa: E402
from jaxprune.train.checkpoint import TrainCheckpoints  # noqa: E402

OPTIONS = {"mobilenet_v2": {"width_mult": 1.4}}


def measure(arch: str, batch: int, size: int, saves: int, steps: int) -> dict:
    mesh = make_mesh()
    m = models.create(arch, num_classes=1000, **OPTIONS.get(arch, {}))
    trainer = Trainer(m, config.TrainConfig(), steps_per_epoch=100, mesh=mesh)
    trainer.start_round()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 1000, batch).astype(np.int32)
    b = to_global({"image": images, "label": labels, "mask": np.ones(batch, np.float32)}, mesh)
    step_times = []
    for _ in range(steps + 1):  # the first step compiles
        t0 = time.perf_counter()
        trainer.train_step(b)
        jax.block_until_ready(trainer.params)
        step_times.append(time.perf_counter() - t0)
    step = statistics.median(step_times[1:])
    trainer.finish_epoch()

    values = sum(int(np.size(x)) for x in jax.tree.leaves(trainer.state()))
    with tempfile.TemporaryDirectory() as folder:
        ckpt = TrainCheckpoints(folder)
        save_times = []
        for i in range(saves):
            t0 = time.perf_counter()
            ckpt.save(trainer, {"epoch": i})
            save_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ckpt.restore(trainer)
        jax.block_until_ready(trainer.params)
        restore = time.perf_counter() - t0
    save = statistics.median(save_times)
    return {"arch": arch, "options": OPTIONS.get(arch, {}), "state_values": values,
            "state_mib": round(values * 4 / 2**20, 1), "save_s": round(save, 3),
            "restore_s": round(restore, 3), "step_s": round(step, 3), "batch": batch,
            "size": size, "save_in_steps": round(save / step, 2),
            "device": jax.devices()[0].device_kind, "devices": jax.device_count()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--saves", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    rows = [measure(a, args.batch, args.size, args.saves, args.steps) for a in args.arch]
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
