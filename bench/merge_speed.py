"""Dense vs fused latency on this machine: JAX (jit) and torch eager, batch 1 and 32.

    python bench/merge_speed.py [--cases mbv2_A,swin_t_mlp] [--batches 1,32]
                                [--runtimes jax,torch] [--repeats 7]

Cases:
* mbv2_A ... mbv2_F: MobileNetV2-1.4 (timm layout, 224 px) with DepthShrinker's
  patterns A-F (DESIGN.md §6): the sites of every removed gate group linearized and,
  as DepthShrinker finetunes them, a ReLU6 after each removed inverted residual; then
  `jaxprune.merge` with its default cost model ("macs").
* swin_t_mlp: Swin-T (224 px) with every MLP GELU removed.
* resnet18_cifar_mid: EASIER's CIFAR ResNet-18 (32 px) with every mid-block ReLU
  removed, default cost model (it keeps the 5x5 and 7x7 block fusions out: more MACs);
  resnet18_cifar_mid_all: the same fused with cost="none" (every block one conv).

Dense is the original network (every activation, BatchNorms unfolded) run the same way:
`jax.jit` of the model, or eager `converters.to_torch` under `torch.no_grad`. Random
weights and BatchNorm statistics. Per (case, batch, runtime): warm-up, then rounds
alternating dense and fused (`--repeats`, three times as many at batch 1); the best
round of each. The published reference speedups (V100,
throughput) and the random-conv substitution measured on this CPU (torch eager, batch
32) are printed beside MobileNetV2's. The last lines are one JSON object per
(case, batch, runtime): case, batch, runtime, dense_ms, fused_ms, speedup.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import converters  # noqa: E402
import jaxprune  # noqa: E402
import models  # noqa: E402
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


def jax_runner(m, x):
    m.eval()
    graphdef, state = nnx.split(m)
    fwd = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))
    xj = jnp.asarray(x)
    return lambda: fwd(state, xj).block_until_ready()


def torch_runner(m, x):
    tm = converters.to_torch(m)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    def run():
        with torch.no_grad():
            tm(xt)
    return run


RUNNERS = {"jax": jax_runner, "torch": torch_runner}


def timed(a, b, repeats: int) -> tuple[float, float]:
    """Best ms of `a` and of `b` over `repeats` rounds, run alternately after a warm-up.

    The best, not the median: on a machine shared with other jobs, a run only gets
    slower than the hardware allows (a torch thread waiting for a busy core can take
    100x longer), so the fastest round is the estimate least disturbed by them."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return float(np.min(ta)), float(np.min(tb))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--runtimes", default="jax,torch")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    for c in cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}; choose from {list(CASES)}")
    batches = [int(b) for b in args.batches.split(",")]
    runtimes = args.runtimes.split(",")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)", flush=True)
    results = []
    for case in cases:
        dense, lin, cost = CASES[case]()
        hw = tuple(dense.spec.input_size)
        t0 = time.perf_counter()
        fused, rep = jaxprune.merge(lin, input_size=hw, cost=cost, return_report=True)
        print(f"\n== {case}: merged in {time.perf_counter() - t0:.1f} s (cost model {cost})")
        dense_prof = jaxprune.profile(dense, hw)
        print(f"  dense {dense_prof}\n  fused {rep.after}")
        print(f"  max |fused - linearized logits| {rep.max_abs_diff:.2e} "
              f"(logits up to {rep.logit_scale:.2e}); {len(rep.fused)} fused layers, "
              f"{len(rep.skipped)} runs kept")
        for batch in batches:
            x = np.random.default_rng(0).normal(size=(batch, *hw, 3)).astype(np.float32)
            for rt in runtimes:
                repeats = args.repeats * (3 if batch == 1 else 1)
                d_ms, f_ms = timed(RUNNERS[rt](dense, x), RUNNERS[rt](fused, x), repeats)
                row = {"case": case, "batch": batch, "runtime": rt, "dense_ms": round(d_ms, 2),
                       "fused_ms": round(f_ms, 2), "speedup": round(d_ms / f_ms, 2)}
                results.append(row)
                print(f"  batch {batch:>2} {rt:<5} dense {d_ms:9.2f} ms  fused {f_ms:9.2f} ms  "
                      f"x{d_ms / f_ms:.2f}", flush=True)
    print("\n| case | batch | runtime | dense ms | fused ms | speedup | reference |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ref = ""
        if r["case"].startswith("mbv2_"):
            k = r["case"][-1]
            ref = f"V100 {PUBLISHED_V100[k]}x, random-conv CPU b32 {RANDOM_CONV_CPU[k]}x"
        print(f"| {r['case']} | {r['batch']} | {r['runtime']} | {r['dense_ms']} | "
              f"{r['fused_ms']} | {r['speedup']}x | {ref} |")
    print()
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
