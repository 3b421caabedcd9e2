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

LATENCY_RUNTIMES, LATENCY_REPEATS = ("jax", "torch"), 30


def fuse_and_export(ctx: RunContext, m: Net, reference: Net, *, cost: str = "macs",
                    export: bool = True) -> tuple[dict, Net]:
    """Fuse `m` with `jaxprune.merge` at the run's input size, profile `reference` (what
    the fused model is compared with: `m` itself, or a dense original) and the fused
    model (depth, params, MACs, latency on this device), and export the fused model to
    `<run>/export`, each step checked against `m` on random inputs.
    Returns ({"merge": ..., "export": ...} for results.json, the fused model)."""
    from jaxprune import merge, profile
    from jaxprune.merging.fuse import without_border_terms
    hw = ctx.image_size
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, *hw, m.spec.in_channels)))
    m.eval()
    logits = np.asarray(m(x))
    small, rep = merge(m, input_size=hw, cost=cost, return_report=True)
    # latency of one image, JAX (jit) and the exported torch module (eager), on this device
    before = profile(reference, hw, latency=LATENCY_RUNTIMES, batch=1, repeats=LATENCY_REPEATS)
    after = profile(small, hw, latency=LATENCY_RUNTIMES, batch=1, repeats=LATENCY_REPEATS)
    # what the border terms cost: the fused model against itself without them
    border = {}
    if after.border_params:
        bare = profile(without_border_terms(small), hw, latency=LATENCY_RUNTIMES, batch=1,
                       repeats=LATENCY_REPEATS)
        border = {k: ms - bare.latency_ms[k] for k, ms in after.latency_ms.items()}
    out = {"merge": {**rep.as_dict(),
                     "depth_before": before.depth, "params_before": before.params,
                     "macs_before": before.macs,
                     "latency_ms_before": before.latency_ms, "latency_ms_after": after.latency_ms,
                     "latency_ms_border": border,
                     "latency_device": jax.devices()[0].device_kind,
                     "max_abs_diff": float(np.max(np.abs(np.asarray(small(x)) - logits)))}}
    if export and distributed.is_main():  # one process writes the run folder
        out["export"] = export_torch(small, ctx.run_dir / "export", x, logits)
    return out, small


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
        for runtime, b in merge["latency_ms_before"].items():
            a = merge["latency_ms_after"][runtime]
            name, batch = runtime.split("@")
            rows.append([f"latency, {name}, batch {batch} (ms)", b, a,
                         f"{a / b:.2f} (speed-up {b / a:.2f}x)"])
        h, w = merge["input_size"]
        blocks = [Table(["", before, "fused", "fused / " + before], rows),
                  f"Latency measured on this machine ({merge['latency_device']}): JAX jit and "
                  f"the exported torch module in eager mode, median of repeated runs.",
                  f"Fused against unfused model: max |Δ logits| = {fmt(merge['max_abs_diff'])} "
                  f"on random inputs; {len(merge['fused'])} layers fused at {h}x{w}, cost "
                  f"model `{merge['cost_model']}`. The fused model runs at "
                  f"{sizes_text(merge['input_sizes'])}."]
        if merge["border_params_after"]:
            blocks.append(_border_table(merge))
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


def _border_table(merge: dict) -> Table:
    """What the fused layers' border terms cost, against the whole fused model."""
    h, w = merge["input_size"]
    share = lambda part, whole: f"{part / whole:.1%}" if whole else None  # noqa: E731
    rows = [["parameters", merge["border_params_after"],
             share(merge["border_params_after"], merge["params_after"])],
            [f"MACs per image at {h}x{w}", merge["border_macs_after"],
             share(merge["border_macs_after"], merge["macs_after"])]]
    for runtime, ms in merge.get("latency_ms_border", {}).items():
        name, batch = runtime.split("@")
        rows.append([f"latency, {name}, batch {batch} (ms; fused minus fused without its "
                     f"border terms)", ms, share(ms, merge["latency_ms_after"][runtime])])
    return Table(["border terms", "cost", "share of the fused model"], rows)
