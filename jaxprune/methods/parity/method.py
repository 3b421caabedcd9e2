"""The parity check of a torch model against its jaxprune conversion (see the package doc)."""
from __future__ import annotations

import numpy as np

from jaxprune.context import MethodResult, RunContext
from jaxprune.report import Report, Section, Table, table


def run(ctx: RunContext) -> MethodResult:
    from converters import torch_reference
    from converters.check import max_abs_diff, torch_pair
    cfg, opts = ctx.cfg, ctx.cfg.method
    # a random torch original is built with the run's class count; weights bring their own
    classes = ctx.num_classes if opts.source == "random" else cfg.model.num_classes
    t, m = torch_pair(cfg.model.name, dict(cfg.model.options), classes, opts.source, cfg.seed)
    tol = torch_reference.tolerance(m.spec.arch)
    sizes = opts.sizes or [m.spec.input_size[0]]
    rng = np.random.default_rng(cfg.seed)
    rows = []
    for size in sizes:
        x = rng.standard_normal((opts.batch, size, size, m.spec.in_channels), dtype=np.float32)
        diff = max_abs_diff(t, m, x)
        rows.append({"size": size, "max_abs_diff": diff, "tolerance": tol,
                     "passed": bool(diff <= tol)})  # NaN fails
    header = ["size", "max |Δ logits|", "tolerance", "result"]
    cells = [[r["size"], f"{r['max_abs_diff']:.3e}", f"{r['tolerance']:.1e}",
              "pass" if r["passed"] else "FAIL"] for r in rows]
    what = (f"{m.spec.arch} {dict(m.spec.options)} with {m.spec.num_classes} classes, source "
            f"{opts.source}, batch {opts.batch}, float32, eval mode")
    ctx.log(f"parity: {what}\n" + "\n".join(table(header, cells)))
    results = {"method": "parity", "model": m.spec.arch, "options": dict(m.spec.options),
               "num_classes": m.spec.num_classes, "source": opts.source, "batch": opts.batch,
               "rows": rows, "passed": all(r["passed"] for r in rows)}
    failure = None
    if not results["passed"]:
        bad = ", ".join(f"{r['size']} px: {r['max_abs_diff']:.3e}" for r in rows if not r["passed"])
        failure = (f"parity failed for {m.spec.arch} ({bad}; tolerance {tol:.1e}); details in "
                   f"{ctx.run_dir / 'results.json'}")
    report = Report(f"parity: {m.spec.arch}", [Section("Largest logit difference",
                                                      [what + ".", Table(header, cells)])])
    return MethodResult(results, report, failure)
