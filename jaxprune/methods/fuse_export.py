"""The last step of every depth-reducing method: fuse the linearized model with
`jaxprune.merge`, profile it against its reference, export it to PyTorch, and the
report sections that say what that gave."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxprune import distributed
from jaxprune.context import RunContext
from jaxprune.merging.fuse import sizes_text
from jaxprune.report import Section, Table, fmt
from models.net import Net

LATENCY_BATCH, LATENCY_ROUNDS, LATENCY_REPEATS = 1, 3, 20
LATENCY_SPEC = "latency/spec.json"


def fuse_and_export(ctx: RunContext, m: Net, dense: Net, *, cost: str = "macs",
                    latency: bool = True, cuts=()) -> tuple[dict, Net]:
    """Fuse `m` with `jaxprune.merge` at the run's input size (`cuts`: the layers whose
    outputs stay materialized, as `merge` takes them), export the fused model to
    `<run>/export` (each step checked against `m` on random inputs), profile the `dense`
    original (what a user runs without jaxprune) and the fused model (depth, params,
    MACs), and, with `latency`, time both on this device (`latency_table`).
    Returns ({"merge": ..., "export": ..., "latency": ...} for results.json, the fused model)."""
    from jaxprune import merge, profile
    hw = ctx.image_size
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, *hw, m.spec.in_channels)))
    m.eval()
    logits = np.asarray(m(x))
    small, rep = merge(m, input_size=hw, cost=cost, return_report=True, cuts=cuts)
    before = profile(dense, hw)
    out = {"merge": {**rep.as_dict(), "depth_before": before.depth,
                     "params_before": before.params, "macs_before": before.macs,
                     "max_abs_diff": float(np.max(np.abs(np.asarray(small(x)) - logits)))}}
    if distributed.is_main():  # one process writes the run folder and times on its machine
        out["export"] = export_torch(small, ctx.run_dir / "export", x, logits)
        if latency:
            ctx.log("timing the dense and the fused model (jaxprune.measure) ...")
            out["latency"] = latency_table(ctx, dense, small, ctx.run_dir / "export")
    return out, small


def latency_table(ctx: RunContext, dense: Net, fused: Net, export: Path) -> dict:
    """ms per batch of `LATENCY_BATCH` images of the dense and the fused model, in JAX (jit)
    and torch (the dense model as torchvision's or timm's own module, the fused one as its
    exported `model.pt2`), each in fresh processes, alternating, `LATENCY_ROUNDS` rounds
    (`jaxprune.measure`); the spec is saved so that `command` reruns it. When the fused
    layers carry border terms, the fused model without them (`without_border_terms`,
    inexact at the borders) is timed alongside: `border_ms` is what the terms cost."""
    from jaxprune.measure.models import model_latency
    from jaxprune.merging.fuse import without_border_terms
    from jaxprune.merging.profiling import border_params
    named = {"dense": dense, "fused": fused}
    if border_params(fused):
        named["bare"] = without_border_terms(fused)
    t = model_latency(named, ctx.image_size, batch=LATENCY_BATCH,
                      programs={"fused": export}, rounds=LATENCY_ROUNDS,
                      repeats=LATENCY_REPEATS, save=ctx.run_dir / LATENCY_SPEC)
    rows = {}
    for runtime in ("jax", "torch"):
        d, f = t[f"dense {runtime}"], t[f"fused {runtime}"]
        rows[runtime] = {"dense_ms": d.median_ms, "dense_spread_ms": list(d.spread_ms),
                         "fused_ms": f.median_ms, "fused_spread_ms": list(f.spread_ms),
                         "speedup": d.median_ms / f.median_ms, "threads": d.threads,
                         "device": d.device}
        if "bare" in named:
            bare = t[f"bare {runtime}"]
            rows[runtime].update({"bare_ms": bare.median_ms,
                                  "border_ms": f.median_ms - bare.median_ms})
    return {"batch": LATENCY_BATCH, "rounds": LATENCY_ROUNDS, "repeats": LATENCY_REPEATS,
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
    did not time its models)."""
    if not latency:
        return ["Latency not measured (method.latency: false)."]
    rows = []
    for runtime, r in latency["runtimes"].items():
        side = ("jit" if runtime == "jax" else
                "eager: dense = torchvision's/timm's own module, fused = model.pt2")
        rows.append([f"{runtime} ({side})", f"{r['dense_ms']:.3f}", _spread(r["dense_spread_ms"]),
                     f"{r['fused_ms']:.3f}", _spread(r["fused_spread_ms"]),
                     f"**{r['speedup']:.2f}x**"])
    device = next(iter(latency["runtimes"].values()))["device"]
    return [Table(["runtime", f"{before} ms", "spread", "fused ms", "spread", "speed-up"], rows),
            f"ms per batch of {latency['batch']} on this machine ({device}), median of "
            f"{latency['rounds']} rounds of {latency['repeats']} calls, each runtime and model "
            f"in a fresh process of its own, the models alternating; spread = min – max of "
            f"the round medians. Rerun: `{latency['command']}`."]


def _spread(pair) -> str:
    return f"{pair[0]:.3f} – {pair[1]:.3f}"


def merge_sections(results: dict, before: str) -> list[Section]:
    """The report's "Fused model" and "Export" sections from results.json's `merge` and
    `export`; `before` names what the fused model is compared with."""
    out = []
    merge = results.get("merge")
    if merge:
        rows = []
        for label, key in (("depth (weight layers)", "depth"), ("parameters", "params"),
                           ("MACs per image", "macs")):
            b, a = merge[f"{key}_before"], merge[f"{key}_after"]
            rows.append([label, b, a, f"{a / b:.2f}" if b else None])
        h, w = merge["input_size"]
        blocks = [Table(["", before, "fused", "fused / " + before], rows),
                  *latency_blocks(results.get("latency"), before),
                  f"Fused against unfused model: max |Δ logits| = {fmt(merge['max_abs_diff'])} "
                  f"on random inputs; {len(merge['fused'])} layers fused at {h}x{w}, cost "
                  f"model `{merge['cost_model']}`. The fused model runs at "
                  f"{sizes_text(merge['input_sizes'])}."]
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
