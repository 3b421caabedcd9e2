"""The last step of every depth-reducing method: fuse the linearized model with
`jaxprune.merge`, profile it against its reference, export it to PyTorch, and the
report sections that say what that gave."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxprune import distributed
from jaxprune.context import RunContext
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
    hw = ctx.image_size
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, *hw, m.spec.in_channels)))
    m.eval()
    logits = np.asarray(m(x))
    small, rep = merge(m, input_size=hw, cost=cost, return_report=True)
    # latency of one image, JAX (jit) and the exported torch module (eager), on this device
    before = profile(reference, hw, latency=LATENCY_RUNTIMES, batch=1, repeats=LATENCY_REPEATS)
    after = profile(small, hw, latency=LATENCY_RUNTIMES, batch=1, repeats=LATENCY_REPEATS)
    out = {"merge": {**rep.as_dict(),
                     "depth_before": before.depth, "params_before": before.params,
                     "macs_before": before.macs,
                     "latency_ms_before": before.latency_ms, "latency_ms_after": after.latency_ms,
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
    return {"path": str(path), "max_abs_diff": float(np.max(np.abs(got - logits)))}


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
        blocks = [Table(["", before, "fused", "fused / " + before], rows),
                  f"Latency measured on this machine ({merge['latency_device']}): JAX jit and "
                  f"the exported torch module in eager mode, median of repeated runs.",
                  f"Fused against unfused model: max |Δ logits| = {fmt(merge['max_abs_diff'])} "
                  f"on random inputs; {len(merge['fused'])} layers fused at "
                  f"{merge['input_size'][0]}x{merge['input_size'][1]}, cost model "
                  f"`{merge['cost_model']}`."]
        fused, kept = merge["fused"], merge["skipped"]
        if fused or kept:
            blocks.append("\n".join(
                [f"<details><summary>{len(fused)} layers fused, {len(kept)} runs kept"
                 f"</summary>", ""]
                + [f"- fused `{f['layer']}` ({f['op']}) from {len(f['replaces'])} layers: "
                   f"{', '.join(f['replaces'])}" for f in fused]
                + [f"- kept {s['run'][0]} .. {s['run'][1]}: {s['reason']}" for s in kept]
                + ["", "</details>"]))
        out.append(Section("Fused model", blocks))
    export = results.get("export")
    if export:
        out.append(Section("Export", ["\n".join(f"{k}: {fmt(v)}" for k, v in export.items())]))
    return out
