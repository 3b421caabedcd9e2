"""EASIER's train step against the official EASIER PyTorch step, each alone in its own process.

    python bench/train_step.py                       # resnet18_cifar, batch 128, 3 rounds
    python bench/train_step.py --rounds 5 --steps 10 --width 16
    python bench/train_step.py --also-devices 1      # + the step on one XLA device

Sides (`jaxprune.measure`: every side of every round in a fresh process, the sides
alternating round by round, warm-up first, median of each round's steps):

* `official`: the published EASIER step in torch (`bench/easier_reference.py`: its own
  ResNet-18, a forward hook on every ReLU, the per-layer entropy read with `.item()`
  every step, SGD), torch's threads = the cores;
* `jaxprune`: `Trainer`'s jitted step with EASIER's entropy statistics
  (`jaxprune.measure.workloads.jax_train_step`), data parallel over one XLA host device
  per core, as `run.py` runs it;
* `jaxprune, no statistics`: the same step without them (what the statistics cost).

The last line is one JSON object: seconds per step of each side (median and every round's
median), `ratio` (= official / jaxprune: above 1, jaxprune is faster) and the setup.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxprune.measure import Workload, measure  # noqa: E402
from jaxprune.report import table  # noqa: E402


def workloads(batch: int, width: int, also_devices: int | None = None) -> list[Workload]:
    step = {"arch": "resnet18_cifar", "options": {"width": width}, "num_classes": 10,
            "batch": batch, "input_size": [32, 32]}
    sides = [Workload("official", "torch", "bench.easier_reference:make_step",
                      {"batch": batch, "width": width}),
             Workload("jaxprune", "jax", "jaxprune.measure.workloads:jax_train_step", step),
             Workload("jaxprune, no statistics", "jax",
                      "jaxprune.measure.workloads:jax_train_step", {**step, "entropy": False})]
    if also_devices:
        sides.append(Workload(f"jaxprune, {also_devices} XLA device(s)", "jax",
                              "jaxprune.measure.workloads:jax_train_step", step,
                              devices=also_devices))
    return sides


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64 = the paper's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each side in its own process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--also-devices", type=int, help="one more side: the jaxprune step on this "
                   "many XLA host devices (run.py and the `jaxprune` side use one per core)")
    p.add_argument("--save", help="write the measurement spec here (rerun: python -m "
                                   "jaxprune.measure SPEC)")
    args = p.parse_args(argv)
    t = measure(workloads(args.batch, args.width, args.also_devices), rounds=args.rounds, warmup=args.warmup,
                repeats=args.steps, save=args.save)
    rows = [[name, f"{x.median_ms / 1e3:.3f}",
             ", ".join(f"{v / 1e3:.3f}" for v in x.burst_medians_ms),
             f"{args.batch / (x.median_ms / 1e3):.1f}", x.threads, x.device]
            for name, x in t.timings.items()]
    print("\n".join(table(["side", "s/step (median)", "round medians", "img/s",
                           "threads / devices", "device"], rows)))
    result = {"bench": "train_step", "model": "resnet18_cifar", "width": args.width,
              "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
              "command": " ".join(["python bench/train_step.py", *(argv or sys.argv[1:])]),
              "sides": {name: {"s_per_step": x.median_ms / 1e3,
                               "round_medians_s": [v / 1e3 for v in x.burst_medians_ms],
                               "threads": x.threads, "device": x.device}
                        for name, x in t.timings.items()},
              "ratio": t.ratio("official", "jaxprune"),
              "stats_overhead": 1.0 - t["jaxprune, no statistics"].median_ms / t["jaxprune"].median_ms}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
