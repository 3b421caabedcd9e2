"""Outputs of a run (DESIGN.md §9): results.json, report.md and PNG plots.

    report.write(run_dir, results)     # results.json, report.md, *.png

`results` follows the schema of DESIGN.md §9: `method`, `model`, `dataset`,
`rounds` (per round: `round`, `linearized`, `n_linear`, `n_sites`, accuracies,
`entropy` {site: H}), `selected`, `merge`, `export`. Plots: the entropy of
every site in every round (heat map) and accuracy against sites linearized.
Only process 0 writes.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

RESULTS, REPORT = "results.json", "report.md"
ENTROPY_PLOT, ACCURACY_PLOT = "entropy.png", "accuracy.png"


def pyplot():
    """matplotlib.pyplot drawing to files only (no display on servers and CI)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a crash never leaves a half-written result."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_files(run_dir, results: dict, report_md: str) -> None:
    """results.json and report.md, on process 0 only."""
    if jax.process_index() != 0:
        return
    run_dir = Path(run_dir)
    write_text_atomic(run_dir / RESULTS, json.dumps(results, indent=1))
    write_text_atomic(run_dir / REPORT, report_md)


def plot_entropy(results: dict, path: Path) -> None:
    """Heat map: sites (rows, forward order) x rounds (columns); cells of sites that are
    already linear in that round are blank, the sites a round picks are outlined."""
    plt = pyplot()
    sites, rounds = results["sites"], results["rounds"]
    values = np.array([[r["entropy"].get(s, np.nan) for r in rounds] for s in sites])
    linear = np.array([[s in r["linearized"] for r in rounds] for s in sites])
    fig, ax = plt.subplots(figsize=(1.6 + 0.45 * len(rounds), 1.2 + 0.28 * len(sites)))
    im = ax.imshow(np.ma.masked_array(values, linear), aspect="auto", cmap="viridis",
                   vmax=1.0, interpolation="nearest")  # vmin from the data: values sit near 1
    ax.set_facecolor("0.85")
    for col, r in enumerate(rounds[1:], start=1):  # a round's new sites were picked from the one before
        for s in r.get("new", []):
            row = sites.index(s)
            ax.add_patch(plt.Rectangle((col - 1.5, row - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xticks(range(len(rounds)), [str(r["round"]) for r in rounds])
    ax.set_yticks(range(len(sites)), sites, fontsize=7)
    ax.set_xlabel("round (grey: site linear; red: picked for the next round)")
    fig.colorbar(im, ax=ax, label="entropy (bits), last training epoch")
    ax.set_title(f"{results['method']}: {results['model']} on {results['dataset']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(results: dict, path: Path) -> None:
    """Validation and test accuracy against the number of sites linearized."""
    plt = pyplot()
    rounds = results["rounds"]
    n = [r["n_linear"] for r in rounds]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label in (("val_acc", "validation"), ("test_acc", "test")):
        ax.plot(n, [r[key] for r in rounds], marker="o", label=label)
    sel = results.get("selected")
    if sel is not None:
        ax.axhline(rounds[0]["val_acc"] - sel["acc_budget"], ls="--", c="0.5",
                   label=f"budget ({sel['acc_budget']} points)")
        ax.plot([sel["n_linear"]], [sel["val_acc"]], marker="*", ms=14, c="red", ls="none",
                label=f"selected (round {sel['round']})")
    ax.set_xlabel(f"sites linearized (of {rounds[0]['n_sites']})")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e-2 and v != 0 else f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "–" if v is None else str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows])


def markdown(results: dict) -> str:
    lines = [f"# {results['method']}: {results['model']} on {results['dataset']}", ""]
    rounds = results.get("rounds", [])
    if rounds:
        lines += ["## Rounds", ""]
        lines += _table(
            ["round", "sites linear", "linearized this round", "train acc", "val acc",
             "test acc", "lowest entropy left"],
            [[r["round"], f"{r['n_linear']}/{r['n_sites']}", ", ".join(r.get("new", [])) or "–",
              r["train_acc"], r["val_acc"], r["test_acc"],
              min((h for s, h in r["entropy"].items() if s not in r["linearized"]), default=None)]
             for r in rounds])
        lines += ["", f"![entropy per site and round]({ENTROPY_PLOT})",
                  f"![accuracy against sites linearized]({ACCURACY_PLOT})", ""]
    sel = results.get("selected")
    if sel:
        lines += ["## Selected", "",
                  f"Round {sel['round']}: {sel['n_linear']} of {sel['n_sites']} sites linear, "
                  f"validation {_fmt(sel['val_acc'])} % "
                  f"({sel['val_acc'] - rounds[0]['val_acc']:+.2f} points against "
                  f"round 0; budget: at most {_fmt(sel['acc_budget'])} lost), "
                  f"test {_fmt(sel['test_acc'])} %.",
                  f"Stopped: {sel['stop']}.", "",
                  "Linear sites: " + (", ".join(sel["linearized"]) or "none"), ""]
    diverged = results.get("diverged")
    if diverged:
        lines += ["## Diverged", "", diverged["message"], ""]
    merge = results.get("merge")
    if merge:
        lines += ["## Merge", ""]
        rows = [[k, merge[f"{k}_before"], merge[f"{k}_after"]]
                for k in ("depth", "params", "macs") if f"{k}_before" in merge]
        latency = merge.get("latency_ms_before")
        if isinstance(latency, dict):  # {runtime@batch: ms}
            rows += [[f"latency {r} (ms)", ms, merge["latency_ms_after"].get(r)]
                     for r, ms in latency.items()]
        if rows:
            lines += _table(["", "before", "after"], rows) + [""]
        fused, kept = merge.get("fused", []), merge.get("skipped", [])
        if fused or kept:
            lines += [f"<details><summary>{len(fused)} layers fused, {len(kept)} runs kept"
                      f"</summary>", ""]
            lines += [f"- fused `{f['layer']}` ({f['op']}) from {len(f['replaces'])} layers: "
                      f"{', '.join(f['replaces'])}" for f in fused]
            lines += [f"- kept {s['run'][0]} .. {s['run'][1]}: {s['reason']}" for s in kept]
            lines += ["", "</details>"]
        shown = {f"{k}_{w}" for k in ("depth", "params", "macs", "latency_ms")
                 for w in ("before", "after")}
        lines += ["", *(f"{k}: {_fmt(v)}" for k, v in merge.items()
                        if k not in shown and not isinstance(v, (list, dict))), ""]
    export = results.get("export")
    if export:
        lines += ["## Export", ""] + [f"{k}: {_fmt(v)}" for k, v in export.items()] + [""]
    if "seconds" in results:
        lines += [f"Run time: {results['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def write_stopped(run_dir, message: str) -> None:
    """report.md of a run that stopped before it had results (e.g. a diverged training)."""
    if jax.process_index() == 0:
        write_text_atomic(Path(run_dir) / REPORT,
                          f"# Run stopped\n\n{message}\n\nThe epochs before it are in "
                          f"metrics.jsonl; its checkpoints are in checkpoints/.\n")


def write(run_dir, results: dict) -> None:
    """results.json, report.md and (for round-based methods) the two plots."""
    if jax.process_index() != 0:
        return
    run_dir = Path(run_dir)
    if results.get("rounds"):
        plot_entropy(results, run_dir / ENTROPY_PLOT)
        plot_accuracy(results, run_dir / ACCURACY_PLOT)
    write_files(run_dir, results, markdown(results))
