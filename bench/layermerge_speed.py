"""layermerge's speed targets, re-runnable: predicted against measured speed-up of a plan.

    python bench/layermerge_speed.py [--cases resnet18,mbv2_100] [--runtime torch] [--drop-layers]
                                     [--strided-blocks] [--batch 1] [--rounds 3] [--bursts 5]
                                     [--threads N] [--table-dir DIR]

Cases (224 px, random weights, BatchNorm statistics randomized):
* resnet18: torchvision's ResNet-18, target_speedup 1.5 (target: >= 1.4x in torch);
* mbv2_100: torchvision's MobileNetV2-1.0, target_speedup 1.6 (target: >= 1.6x in torch).

Each case runs what `method: layermerge` runs, minus training: the search space, the
latency table of every segment (`--runtime`: `torch`, each segment's merged layer exported
and its `model.pt2` timed eagerly, or `jax`, jitted; `jaxprune.measure`, kept in
`--table-dir` and reused on the next run), ECDC's T_opt, `bn_entropy` importance (data-free
from the BatchNorms; ResNet's `relu2` sites, after the residual add, have no BatchNorm
before them and take their entropy on random normal images instead, as the weights are
random too), the exact DP under the budget (when the table's fastest plan is slower than
the target, the bench says so and plans the fastest), the plan applied, `jaxprune.merge` with the
plan's cuts (`cost="none"`), and the export. Then it times the whole models
(`jaxprune.measure.models.model_latency`: every model and runtime in a fresh process of
its own for each of `--rounds` rounds, dense and fused taking turns `--bursts` times a
round, `--repeats` calls a burst; median of the burst medians, spread = their min-max;
"burst by burst": the median and min-max of dense over fused burst by burst, the two
timed in the same turn, which is less exposed to the machine's drift): in torch
torchvision's own dense model against the fused `model.pt2`, in JAX the dense jaxprune
model against the fused one.

"predicted" is the table's speed-up of the whole model: the model (BatchNorms folded)
timed with the segments, over that time less what the plan saves (unmerged sum of T less
the plan's sum of T_opt, each T its time less the runtime's per-call overhead, which the
table times with the segments and the bench prints). The budget is on that prediction.
The measured dense side, torchvision's module, also runs its BatchNorms unfolded.
The last lines are one JSON object per (case, runtime).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import converters  # noqa: E402
import jaxprune  # noqa: E402
import models  # noqa: E402
from jaxprune.measure.models import model_latency  # noqa: E402
from jaxprune.methods.layermerge.importance import segment_importance, site_scores  # noqa: E402
from jaxprune.methods.layermerge.latency import latency_table, table_key  # noqa: E402
from jaxprune.errors import UserError  # noqa: E402
from jaxprune.methods.layermerge.method import (budget_ms, fastest_ms, search,  # noqa: E402
                                                stage_one)
from jaxprune.methods.layermerge.space import apply_edits, build_space  # noqa: E402
from jaxprune.report import table  # noqa: E402
from models.net import randomize_bn  # noqa: E402

HW = (224, 224)
BINS = 1000  # the DP's time grid over the budget (method.bins' default)
# case: (arch, options, target_speedup, the speed target measured in torch)
CASES = {"resnet18": ("resnet18", {}, 1.5, 1.4),
         "mbv2_100": ("mobilenet_v2", {"width_mult": 1.0}, 1.6, 1.6)}


def random_batches(n: int = 2, batch: int = 8):
    """Random normal images: the data for the sites bn_entropy cannot score from a
    BatchNorm (the weights are random, so there is no real data to prefer)."""
    rng = np.random.default_rng(0)
    return [{"image": rng.normal(size=(batch, *HW, 3)).astype(np.float32)} for _ in range(n)]


def plan_case(case: str, runtime: str, batch: int, rounds: int, repeats: int,
              threads: int | None, table_dir: Path, drop_layers: bool,
              strided_blocks: bool = False) -> dict:
    """Space, table, search and the planned, merged model of `case`."""
    arch, options, target, _ = CASES[case]
    dense = randomize_bn(models.create(arch, num_classes=1000, **options))
    ms = build_space(dense, drop_layers=drop_layers, strided_blocks=strided_blocks)
    key = table_key(ms, HW, batch, runtime)
    space = ("lm" if drop_layers else "ecdc") + ("-sb" if strided_blocks else "")
    cache = table_dir / f"{case}-{space}-{runtime}-b{batch}-t{threads or 'cores'}.json"
    t0 = time.perf_counter()
    lt = latency_table(dense, ms, key, cache, rounds=rounds, repeats=repeats, threads=threads)
    table_s = time.perf_counter() - t0
    topt, breaks, unmerged = stage_one(ms, lt.T)
    L = ms.space.positions
    try:
        budget, reached = budget_ms(types.SimpleNamespace(latency_ms=None,
                                                          target_speedup=target),
                                    ms, topt, unmerged, lt), True
    except UserError as e:  # the table's fastest plan is slower than the target: take it
        print(f"  {case}: {e}; planning the fastest instead", flush=True)
        # ceil rounding adds under one bin per segment (at most L of BINS): leave room
        budget, reached = fastest_ms(ms, topt) / (1 - ms.space.positions / BINS), False
    scores, source = site_scores(dense, ms, "bn_entropy", random_batches)
    plan, pieces = search(ms, [topt], breaks, segment_importance(ms, scores), [budget], BINS,
                          (runtime,))
    edits = ms.edits(plan, pieces)
    planned = apply_edits(nnx.clone(dense), edits)
    fused, rep = jaxprune.merge(planned, input_size=HW, cost="none", cuts=edits.cuts,
                                return_report=True)
    return {"dense": dense, "fused": fused, "report": rep, "segments": len(ms.segments),
            "positions": L, "table_s": table_s, "table": str(cache),
            "overhead_ms": lt.overhead_ms, "model_ms": lt.model_ms, "unmerged_ms": unmerged,
            "predicted_model_ms": lt.model_after(unmerged, plan.time_ms),
            "budget_ms": budget, "planned_ms": plan.time_ms, "target": target,
            "reached": reached,
            "linearized": list(edits.linearize), "inserted": list(edits.insert_act),
            "dropped": list(edits.drop),
            "pieces": [list(pieces.get((s.start, s.end), (s.start, s.end)))
                       + ([s.option] if drop_layers else []) for s in plan.segments],
            "data_sites": sorted(s for s, v in source.items() if v == "data")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="resnet18,mbv2_100", help=f"comma list of {list(CASES)}")
    p.add_argument("--runtime", default="torch", choices=("jax", "torch"),
                   help="the latency table's runtime")
    p.add_argument("--batch", type=int, default=1, help="batch of the table and the timing")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each a fresh process")
    p.add_argument("--bursts", type=int, default=5,
                   help="turns of each model a round (the sides alternate burst by burst)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per burst, and per round of the latency table")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads and JAX host devices (default: one per core)")
    p.add_argument("--drop-layers", action="store_true",
                   help="LayerMerge's space (convs inside the blocks may be dropped; "
                        "drop_penalty 1) instead of ECDC's")
    p.add_argument("--strided-blocks", action="store_true",
                   help="beyond the papers: a ResNet downsampling block may merge as a "
                        "whole (method.strided_blocks)")
    p.add_argument("--table-dir", default="runs/bench/layermerge_tables",
                   help="where latency tables are kept and reused")
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    for c in cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}; choose from {list(CASES)}")
    table_dir = Path(args.table_dir)
    table_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for case in cases:
        t0 = time.perf_counter()
        c = plan_case(case, args.runtime, args.batch, args.rounds, args.repeats, args.threads,
                      table_dir, args.drop_layers, args.strided_blocks)
        rep = c["report"]
        predicted = c["model_ms"] / c["predicted_model_ms"]
        print(f"\n== {case}: {c['positions']} positions, {c['segments']} segments; table "
              f"({args.runtime}, batch {args.batch}) {c['table_s']:.0f} s, {c['table']}")
        print(f"  per-call overhead {c['overhead_ms'] * 1000:.1f} us, taken off every entry"
              if c["overhead_ms"] else "  no per-call overhead recorded in this (older) "
              "table: its entries are taken as measured")
        print(f"  unmerged {c['unmerged_ms']:.3f} ms, budget {c['budget_ms']:.3f} ms "
              f"(target {c['target']}x{'' if c['reached'] else ', out of reach'}), planned "
              f"{c['planned_ms']:.3f} ms; whole model {c['model_ms']:.3f} ms (BatchNorms "
              f"folded) -> {c['predicted_model_ms']:.3f} ms: predicted {predicted:.2f}x")
        print(f"  linearized {c['linearized']}; inserted {c['inserted']}; dropped "
              f"{c['dropped']}")
        print(f"  pieces {c['pieces']}")
        print(f"  entropy from random images (no BatchNorm before): {c['data_sites']}")
        print(f"  planned {rep.before}\n  fused   {rep.after}")
        print(f"  max |fused - planned logits| {rep.max_abs_diff:.2e}; searched and merged "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            program = converters.export(c["fused"], Path(tmp) / "fused")
            t = model_latency({"dense": c["dense"], "fused": c["fused"]}, HW, batch=args.batch,
                              programs={"fused": program}, rounds=args.rounds,
                              bursts=args.bursts, repeats=args.repeats, threads=args.threads)
        for rt in ("torch", "jax"):
            d, f = t[f"dense {rt}"], t[f"fused {rt}"]
            row = {"case": case, "space": "layermerge" if args.drop_layers else "ecdc",
                   "strided_blocks": args.strided_blocks, "runtime": rt, "batch": args.batch,
                   "table_runtime": args.runtime, "target_speedup": c["target"],
                   "target_in_reach": c["reached"],
                   "speed_target": CASES[case][3] if rt == "torch" else None,
                   "overhead_ms": round(c["overhead_ms"], 4), "dropped": len(c["dropped"]),
                   "linearized": len(c["linearized"]),
                   "predicted_speedup": round(predicted, 3),
                   "dense_ms": round(d.median_ms, 2), "fused_ms": round(f.median_ms, 2),
                   "dense_spread_ms": [round(v, 2) for v in d.spread_ms],
                   "fused_spread_ms": [round(v, 2) for v in f.spread_ms],
                   "measured_speedup": round(d.median_ms / f.median_ms, 3),
                   "burst_speedups": [round(v, 3) for v in
                                      t.paired(f"dense {rt}", f"fused {rt}")],
                   "threads": d.threads, "device": d.device, "rounds": args.rounds,
                   "bursts": args.bursts, "repeats": args.repeats}
            results.append(row)
            print(f"  {rt:<5} dense {d.median_ms:8.2f} ms {row['dense_spread_ms']}  fused "
                  f"{f.median_ms:8.2f} ms {row['fused_spread_ms']}  measured "
                  f"x{row['measured_speedup']:.2f} (predicted x{predicted:.2f}); burst by "
                  f"burst x{np.median(row['burst_speedups']):.2f} "
                  f"[{min(row['burst_speedups'])}, {max(row['burst_speedups'])}]", flush=True)
    rows = [[r["case"], r["runtime"], r["batch"], f"{r['target_speedup']}x",
             f"{r['predicted_speedup']}x", r["dense_ms"], r["fused_ms"],
             f"{r['measured_speedup']}x", r["speed_target"] or ""]
            for r in results]
    print("\n" + "\n".join(table(["case", "runtime", "batch", "budget", "predicted",
                                  "dense ms", "fused ms", "measured", "speed target"],
                                 rows)) + "\n")
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
