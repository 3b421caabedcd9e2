"""Dense vs fused latency on this machine, JAX and torch, each side alone in its own process.

    python bench/merge_speed.py [--cases mbv2_A,swin_t_mlp] [--batches 1,32] [--rounds 3]

Cases:
* mbv2_A ... mbv2_F: MobileNetV2-1.4 (timm layout, 224 px) with DepthShrinker's
  patterns A-F (DESIGN.md §6): the sites of every removed gate linearized and, as
  DepthShrinker finetunes them, a ReLU6 after each removed inverted residual; then
  `jaxprune.merge` with its default cost model ("macs").
* swin_t_mlp: Swin-T (224 px) with every MLP GELU removed.
* resnet18_cifar_mid: EASIER's CIFAR ResNet-18 (32 px) with every mid-block ReLU
  removed, default cost model; resnet18_cifar_mid_all: the same fused with cost="none".

What is timed (`jaxprune.measure.models.model_latency`: every model and runtime in a
fresh process of its own, dense and fused alternating burst by burst, 3 rounds of 3
bursts, median of the burst medians, spread = min-max of the burst medians):
* torch: the dense side is what users run, torchvision's or timm's own module (eager,
  `no_grad`); the fused side is jaxprune's export, `model.pt2` loaded by torch alone;
* JAX: the jaxprune dense model and the fused model, jitted, eval mode.
Random weights and BatchNorm statistics. The published speed-ups (V100, throughput) and
the random-conv substitution measured on a CPU (torch eager, batch 32) are printed beside
MobileNetV2's. The last lines are one JSON object per (case, batch, runtime).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import converters  # noqa: E402
import jaxprune  # noqa: E402
import models  # noqa: E402
from jaxprune.measure.models import model_latency  # noqa: E402
from jaxprune.report import table  # noqa: E402
from models.layers import Act  # noqa: E402
from models.net import randomize_bn  # noqa: E402

# DESIGN.md §6: 1 = keep the gate group's activations
PATTERNS = {
    "A": "0,1,0,0,1,1,0,1,0,1,0,1,1,0,1,1,1,1,1",
    "B": "1,0,0,0,1,1,0,0,0,0,0,1,1,0,1,1,1,1,1",
    "C": "1,1,0,0,1,0,0,0,0,0,0,1,1,0,1,1,1,1,1",
    "D": "0,0,0,0,1,1,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "E": "0,1,0,0,1,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "F": "1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1",
}
PUBLISHED_V100 = {"A": 1.80, "B": 2.25, "C": 2.16, "D": 2.61, "E": 2.50, "F": 5.08}
RANDOM_CONV_CPU = {"A": 2.2, "B": 2.3, "C": 2.5, "D": 2.5, "E": 3.0, "F": 4.0}


def mbv2_pattern(letter: str):
    """(dense, linearized) MobileNetV2-1.4 for a DepthShrinker pattern."""
    from jaxprune.methods.depthshrinker.groups import final_act_name, groups
    dense = randomize_bn(models.create("mobilenet_v2", num_classes=1000, width_mult=1.4,
                                       layout="timm"))
    lin = randomize_bn(models.create("mobilenet_v2", num_classes=1000, width_mult=1.4,
                                     layout="timm"))
    keep = [int(v) for v in PATTERNS[letter].split(",")]
    for g, k in zip(groups(lin), keep):
        if k:
            continue
        jaxprune.linearize(lin, g.sites)
        if g.final is not None:  # an inverted residual: DepthShrinker's ReLU6 after its output
            lin.insert_after(g.final, final_act_name(g), Act("relu6"))
    return dense, lin, "macs"


def swin_mlp():
    dense = models.create("swin_t", num_classes=1000)
    lin = models.create("swin_t", num_classes=1000)
    jaxprune.linearize(lin, lin.sites())
    return dense, lin, "macs"


def resnet_mid(cost: str):
    def build():
        dense = randomize_bn(models.create("resnet18_cifar", num_classes=10))
        lin = randomize_bn(models.create("resnet18_cifar", num_classes=10))
        jaxprune.linearize(lin, [s for s in lin.sites() if s.endswith("relu1")])
        return dense, lin, cost
    return build


CASES = {**{f"mbv2_{k}": (lambda k=k: mbv2_pattern(k)) for k in PATTERNS},
         "swin_t_mlp": swin_mlp,
         "resnet18_cifar_mid": resnet_mid("macs"),
         "resnet18_cifar_mid_all": resnet_mid("none")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--runtimes", default="jax,torch")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per burst")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each side in its own process")
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    for c in cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}; choose from {list(CASES)}")
    batches = [int(b) for b in args.batches.split(",")]
    runtimes = args.runtimes.split(",")
    results = []
    for case in cases:
        dense, lin, cost = CASES[case]()
        hw = tuple(dense.spec.input_size)
        t0 = time.perf_counter()
        fused, rep = jaxprune.merge(lin, input_size=hw, cost=cost, return_report=True)
        print(f"\n== {case}: merged in {time.perf_counter() - t0:.1f} s (cost model {cost})")
        print(f"  dense {jaxprune.profile(dense, hw)}\n  fused {rep.after}")
        print(f"  max |fused - linearized logits| {rep.max_abs_diff:.2e} "
              f"(logits up to {rep.logit_scale:.2e}); {len(rep.fused)} fused layers, "
              f"{len(rep.skipped)} runs kept", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            program = converters.export(fused, Path(tmp) / "fused")
            for batch in batches:
                t = model_latency({"dense": dense, "fused": fused}, hw, batch=batch,
                                  runtimes=runtimes, programs={"fused": program},
                                  rounds=args.rounds, repeats=args.repeats)
                for rt in runtimes:
                    d, f = t[f"dense {rt}"], t[f"fused {rt}"]
                    row = {"case": case, "batch": batch, "runtime": rt,
                           "dense_ms": round(d.median_ms, 2), "fused_ms": round(f.median_ms, 2),
                           "dense_spread_ms": [round(v, 2) for v in d.spread_ms],
                           "fused_spread_ms": [round(v, 2) for v in f.spread_ms],
                           "speedup": round(d.median_ms / f.median_ms, 2),
                           "threads": d.threads, "device": d.device}
                    results.append(row)
                    print(f"  batch {batch:>2} {rt:<5} dense {d.median_ms:9.2f} ms  fused "
                          f"{f.median_ms:9.2f} ms  x{row['speedup']:.2f}", flush=True)
    rows = []
    for r in results:
        ref = ""
        if r["case"].startswith("mbv2_"):
            k = r["case"][-1]
            ref = f"V100 {PUBLISHED_V100[k]}x, random-conv CPU b32 {RANDOM_CONV_CPU[k]}x"
        rows.append([r["case"], r["batch"], r["runtime"], r["dense_ms"], r["fused_ms"],
                     f"{r['speedup']}x", ref])
    print("\n" + "\n".join(table(["case", "batch", "runtime", "dense ms", "fused ms",
                                  "speed-up", "reference"], rows)) + "\n")
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
