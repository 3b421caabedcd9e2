"""The last step of every depth-reducing method: fuse the linearized model with
`jaxprune.merge`, profile it against its reference, export it to PyTorch, and the
report sections that say what that gave."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import jax
import numpy as np

from jaxprune import distributed
from jaxprune.context import RunContext
from jaxprune.merging.fuse import sizes_text
from jaxprune.report import Section, Table, fmt
from models.net import Net

LATENCY_BATCH, LATENCY_ROUNDS, LATENCY_BURSTS, LATENCY_REPEATS = 1, 3, 3, 20
LATENCY_DIR = "latency"   # the timing spec and, under the guard, the programs it timed
LATENCY_SPEC = f"{LATENCY_DIR}/spec.json"


def fuse_and_export(ctx: RunContext, m: Net, dense: Net, *, cost: str = "macs",
                    latency: bool = True, cuts=(), guard: bool = False,
                    rounds: int = LATENCY_ROUNDS, batch: int = LATENCY_BATCH
                    ) -> tuple[dict, Net]:
    """Fuse `m` with `jaxprune.merge` at the run's input size (`cuts`: the layers whose
    outputs stay materialized, as `merge` takes them; under `cost="latency"` its candidates
    are timed at `batch`), export the fused model to `<run>/export` (each step checked
    against `m` on random inputs), profile the `dense` original (what a user runs without
    jaxprune) and the fused model (depth, params, MACs), and, with `latency`, time both on
    this device (`latency_table`, `rounds` rounds, ms per batch of `batch` images).

    With `latency` and `guard`, the fused model is also timed against its unfused self:
    `m` merged with every run left unfused (`fold_only_cuts`: BatchNorms folded, identity
    sites removed). Where the fused model measures slower in JAX or in torch, the unfused
    one is what is exported and returned; results["guard"] says which and the medians.
    Returns ({"merge": ..., "export": ..., "latency": ..., "guard": ...} for results.json,
    the exported model)."""
    from jaxprune import merge, profile
    from jaxprune.merging.fuse import fold_only_cuts
    hw = ctx.image_size
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, *hw, m.spec.in_channels)))
    m.eval()
    logits = np.asarray(m(x))
    small, rep = merge(m, input_size=hw, cost=cost, batch=batch, return_report=True,
                       cuts=cuts)
    before = profile(dense, hw)
    out = {"merge": {**rep.as_dict(), "depth_before": before.depth,
                     "params_before": before.params, "macs_before": before.macs,
                     "max_abs_diff": _diff(small, x, logits)}}
    export = ctx.run_dir / "export"
    if not (latency and guard):
        if distributed.is_main():  # one process writes the run folder and times on its machine
            out["export"] = export_torch(small, export, x, logits)
            if latency:
                ctx.log("timing the dense and the fused model (jaxprune.measure) ...")
                out["latency"] = latency_table(ctx, dense, small, export, rounds=rounds,
                                               batch=batch)
        return out, small

    unfused = merge(m, input_size=hw, cost="none", cuts=(*cuts, *fold_only_cuts(m)),
                    verify=False)  # checked below, as the fused model is
    p = profile(unfused, hw)
    out["unfused"] = {"depth": p.depth, "params": p.params, "macs": p.macs,
                      "max_abs_diff": _diff(unfused, x, logits)}
    same = _layers(unfused) == _layers(small)
    use_unfused = False
    if distributed.is_main():
        timed = ctx.run_dir / LATENCY_DIR
        exports = {"fused": export_torch(small, timed / "fused", x, logits)}
        if not same:
            exports["unfused"] = export_torch(unfused, timed / "unfused", x, logits)
        ctx.log(f"timing the dense{'' if same else ', the unfused'} and the fused model "
                f"(jaxprune.measure) ...")
        out["latency"] = latency_table(ctx, dense, small, timed / "fused", rounds=rounds,
                                       unfused=None if same else (unfused, timed / "unfused"),
                                       batch=batch)
        out["guard"] = guard_decision(out["latency"], same)
        use_unfused = out["guard"]["exported"] == "unfused"
        chosen = "unfused" if use_unfused else "fused"
        shutil.rmtree(export, ignore_errors=True)
        shutil.copytree(timed / chosen, export)
        out["export"] = {**exports[chosen], "path": str(export)}
        ctx.log(out["guard"]["why"])
    use_unfused = distributed.broadcast_json(use_unfused)  # every process: process 0's choice
    return out, unfused if use_unfused else small


def _diff(model: Net, x: np.ndarray, logits: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(model(x)) - logits)))


def _layers(model: Net) -> tuple:
    """What a model computes with, as structure: its graph and each layer's kind and config."""
    return model.graph, tuple((n, type(layer).__name__, json.dumps(layer.config(), sort_keys=True,
                                                                   default=str))
                              for n, layer in model.named_layers())


RUNTIME_NAMES = {"jax": "JAX", "torch": "torch"}


def guard_decision(latency: dict, same: bool) -> dict:
    """Which model to export, from `latency_table`'s record: the unfused one where the fused
    one measured slower in any runtime timed (medians: JAX's jitted model, or torch's
    `model.pt2`, what the export is), else the fused one; `why` says it with every
    runtime's two numbers. `same`: no run was fused (the fused model is its unfused self,
    timed once)."""
    rows = latency["runtimes"]
    if same:
        return {"exported": "fused", "slower_in": [],
                "why": "no run was fused: the fused model is its unfused self (BatchNorms "
                       "folded), exported as it is"}
    slower = [rt for rt, r in rows.items() if r["fused_ms"] > r["unfused_ms"]]
    times = "; ".join(f"{RUNTIME_NAMES.get(rt, rt)}: {r['fused_ms']:.3f} against "
                      f"{r['unfused_ms']:.3f} ms" for rt, r in rows.items())
    batch = latency["batch"]
    if slower:
        why = (f"the fused model measured slower than its unfused self in "
               f"{' and '.join(RUNTIME_NAMES.get(rt, rt) for rt in slower)} ({times}, per "
               f"batch of {batch}): the unfused model (BatchNorms folded, no run fused) is "
               f"exported instead")
    else:
        why = (f"the fused model measured no slower than its unfused self ({times}, per batch "
               f"of {batch}): the fused model is exported")
    return {"exported": "unfused" if slower else "fused", "slower_in": slower, "why": why}


def latency_table(ctx: RunContext, dense: Net, fused: Net, export: Path,
                  unfused: tuple[Net, Path] | None = None, rounds: int = LATENCY_ROUNDS,
                  batch: int = LATENCY_BATCH) -> dict:
    """ms per batch of `batch` images of the dense and the fused model (and of the
    `unfused` model with its export folder, when given), in JAX (jit) and torch (the dense
    model as torchvision's or timm's own module, the others as their exported `model.pt2`),
    each in fresh processes, alternating burst by burst, `rounds` rounds of
    `LATENCY_BURSTS` bursts (`jaxprune.measure`); the spec is
    saved in `<run>/latency` so that `command` reruns it. When the fused layers carry border
    terms, the fused model without them (`without_border_terms`, inexact at the borders;
    exported to `<run>/latency/bare` for the rerun) is timed alongside: `border_ms` is what
    the terms cost."""
    import converters
    from jaxprune.measure.models import model_latency
    from jaxprune.merging.fuse import without_border_terms
    from jaxprune.merging.profiling import border_params
    named, programs = {"dense": dense}, {"fused": export}
    if unfused is not None:
        named["unfused"], programs["unfused"] = unfused
    named["fused"] = fused
    if border_params(fused):
        named["bare"] = without_border_terms(fused)
        programs["bare"] = converters.export(named["bare"], ctx.run_dir / LATENCY_DIR / "bare")
    t = model_latency(named, ctx.image_size, batch=batch, programs=programs,
                      rounds=rounds, bursts=LATENCY_BURSTS, repeats=LATENCY_REPEATS,
                      save=ctx.run_dir / LATENCY_SPEC)
    rows = {}
    for runtime in ("jax", "torch"):
        d, f = t[f"dense {runtime}"], t[f"fused {runtime}"]
        paired = t.paired(f"dense {runtime}", f"fused {runtime}")
        rows[runtime] = {"dense_ms": d.median_ms, "dense_spread_ms": list(d.spread_ms),
                         "fused_ms": f.median_ms, "fused_spread_ms": list(f.spread_ms),
                         "speedup": d.median_ms / f.median_ms,
                         "speedup_by_burst": statistics.median(paired),
                         "speedup_by_burst_spread": [min(paired), max(paired)],
                         "threads": d.threads, "device": d.device}
        if "unfused" in named:
            u = t[f"unfused {runtime}"]
            rows[runtime].update({"unfused_ms": u.median_ms, "unfused_spread_ms": list(u.spread_ms),
                                  "speedup_vs_unfused": u.median_ms / f.median_ms})
        if "bare" in named:
            bare = t[f"bare {runtime}"]
            rows[runtime].update({"bare_ms": bare.median_ms,
                                  "border_ms": f.median_ms - bare.median_ms})
    return {"batch": batch, "rounds": rounds, "bursts": LATENCY_BURSTS,
            "repeats": LATENCY_REPEATS,
            "command": t.command, "runtimes": rows}


def export_torch(m: Net, folder: Path, x: np.ndarray, logits: np.ndarray) -> dict:
    """`converters.export` of `m` into `folder`, checked with torch on `x` against `logits`."""
    import torch

    import converters
    path = converters.export(m, folder)
    module = converters.to_torch(m)
    with torch.no_grad():
        got = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    return {"path": str(path), "max_abs_diff": float(np.max(np.abs(got - logits))),
            "pt2": json.loads((path / "arch.json").read_text())["pt2"]}


def latency_blocks(latency: dict | None, before: str) -> list:
    """The latency table of a report, from `latency_table`'s record (nothing when the run
    did not time its models): a column pair per model timed (`before`, the unfused model
    where the run timed it, the fused one) and the fused model's speed-ups."""
    if not latency:
        return ["Latency not measured (method.latency: false)."]
    first = next(iter(latency["runtimes"].values()))
    unfused = "unfused_ms" in first
    header = ["runtime", f"{before} ms", "spread"]
    header += ["unfused ms", "spread"] if unfused else []
    header += ["fused ms", "spread", "speed-up" + (f" vs {before}" if unfused else ""),
               "burst by burst" + (f" vs {before}" if unfused else "")]
    header += ["speed-up vs unfused"] if unfused else []
    rows = []
    for runtime, r in latency["runtimes"].items():
        side = ("jit" if runtime == "jax" else
                f"eager: {before} = torchvision's/timm's own module, "
                f"{'unfused and ' if unfused else ''}fused = model.pt2")
        row = [f"{runtime} ({side})", f"{r['dense_ms']:.3f}", _spread(r["dense_spread_ms"])]
        if unfused:
            row += [f"{r['unfused_ms']:.3f}", _spread(r["unfused_spread_ms"])]
        row += [f"{r['fused_ms']:.3f}", _spread(r["fused_spread_ms"]), f"**{r['speedup']:.2f}x**",
                _ratio(r["speedup_by_burst"], r["speedup_by_burst_spread"])]
        if unfused:
            row.append(f"**{r['speedup_vs_unfused']:.2f}x**")
        rows.append(row)
    return [Table(header, rows),
            f"ms per batch of {latency['batch']} on this machine ({first['device']}), each "
            f"runtime and model in a fresh process of its own, {latency['rounds']} rounds of "
            f"{latency['bursts']} bursts of {latency['repeats']} calls, the models "
            f"taking turns burst by burst; median of the burst medians, spread = their min – "
            f"max. Burst by burst: the median (min – max) of {before} over fused, burst k of "
            f"each timed in the same turn, which is less exposed to the machine's drift than "
            f"the ratio of medians. Rerun: `{latency['command']}`."]


def _spread(pair) -> str:
    return f"{pair[0]:.3f} – {pair[1]:.3f}"


def _ratio(median: float, spread) -> str:
    """A speed-up and its spread: "1.35x (1.20x – 1.50x)"."""
    return f"{median:.2f}x ({spread[0]:.2f}x – {spread[1]:.2f}x)"


def merge_sections(results: dict, before: str) -> list[Section]:
    """The report's "Fused model" and "Export" sections from results.json's `merge` and
    `export`; `before` names what the fused model is compared with."""
    out = []
    merge = results.get("merge")
    if merge:
        unfused = results.get("unfused")
        rows = []
        for label, key in (("depth (weight layers)", "depth"), ("parameters", "params"),
                           ("MACs per image", "macs")):
            b, a = merge[f"{key}_before"], merge[f"{key}_after"]
            rows.append([label, b, *([unfused[key]] if unfused else []), a,
                         f"{a / b:.2f}" if b else None])
        h, w = merge["input_size"]
        blocks = [Table(["", before, *(["unfused"] if unfused else []), "fused",
                         "fused / " + before], rows),
                  *latency_blocks(results.get("latency"), before),
                  f"Fused against the linearized model: max |Δ logits| = "
                  f"{fmt(merge['max_abs_diff'])} on random inputs; {len(merge['fused'])} layers "
                  f"fused at {h}x{w}, cost model `{merge['cost_model']}`. The fused model runs "
                  f"at {sizes_text(merge['input_sizes'])}."]
        if unfused:
            blocks.append(f"Unfused: the same linearized model with no run fused (BatchNorms "
                          f"folded, identity sites removed), max |Δ logits| = "
                          f"{fmt(unfused['max_abs_diff'])}.")
        if "guard" in results:
            blocks.append(f"**Exported: the {results['guard']['exported']} model**: "
                          f"{results['guard']['why']}.")
        if merge["border_params_after"]:
            blocks.append(_border_table(merge, results.get("latency")))
        fused, kept = merge["fused"], merge["skipped"]
        if fused or kept:
            blocks.append("\n".join(
                [f"<details><summary>{len(fused)} layers fused, {len(kept)} runs kept"
                 f"</summary>", ""]
                + [f"- fused `{f['layer']}` ({f['op']}; {f['sizes']}; border terms "
                   f"{f['border_params']:,} parameters, {f['border_macs']:,} MACs) from "
                   f"{len(f['replaces'])} layers: {', '.join(f['replaces'])}" for f in fused]
                + [f"- kept {s['run'][0]} .. {s['run'][1]}: {s['reason']}" for s in kept]
                + ["", "</details>"]))
        out.append(Section("Fused model", blocks))
    export = results.get("export")
    if export:
        export = dict(export)
        pt2 = export.pop("pt2", None)
        if pt2 is not None:
            export["model.pt2 input sizes"] = (
                f"every size from {pt2['min'][0]}x{pt2['min'][1]} on" if pt2["dynamic"]
                else f"{pt2['size'][0]}x{pt2['size'][1]} only ({pt2['why']})")
        out.append(Section("Export", ["\n".join(f"{k}: {fmt(v)}" for k, v in export.items())]))
    return out


def _border_table(merge: dict, latency: dict | None) -> Table:
    """What the fused layers' border terms cost, against the whole fused model: their
    parameters and MACs (`merge`), and their latency where the run timed the fused model
    with and without them (`latency_table`)."""
    h, w = merge["input_size"]
    share = lambda part, whole: f"{part / whole:.1%}" if whole else None  # noqa: E731
    rows = [["parameters", merge["border_params_after"],
             share(merge["border_params_after"], merge["params_after"])],
            [f"MACs per image at {h}x{w}", merge["border_macs_after"],
             share(merge["border_macs_after"], merge["macs_after"])]]
    for runtime, r in ((latency or {}).get("runtimes") or {}).items():
        if "border_ms" in r:
            rows.append([f"latency, {runtime}, batch {latency['batch']} (ms; fused minus fused "
                         f"without its border terms)", f"{r['border_ms']:.3f}",
                         share(r["border_ms"], r["fused_ms"])])
    return Table(["border terms", "cost", "share of the fused model"], rows)
