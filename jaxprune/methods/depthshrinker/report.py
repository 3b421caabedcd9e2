"""DepthShrinker's report: accuracy of each stage, the pattern, the search, the fused model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxprune.methods.fuse_export import merge_sections
from jaxprune.report import Figure, Report, Section, Table, pyplot

SCORES_PLOT, PATTERN_PLOT = "gate_scores.png", "pattern.png"


def report(results: dict) -> Report:
    search, ft = results.get("search"), results.get("finetune")
    rows = [["dense (original)", results["dense"]["val_acc"], results["dense"]["test_acc"]]]
    if search:
        rows.append([f"search: gated, {search['k']} of {len(search['keep'])} gates kept",
                     search["val_acc"], search["test_acc"]])
    if ft:
        rows.append([f"finetuned, {len(ft['keep']) - len(ft['removed_gates'])} of "
                     f"{len(ft['keep'])} gates kept", ft["val_acc"], ft["test_acc"]])
        rows.append(["fused", None, results["fused"]["test_acc"]])
    sections = [Section("Accuracy", [Table(["model", "val acc (%)", "test acc (%)"], rows)])]

    keep = _pattern(results)
    header = ["gate", "sites", "kept"]
    if search:
        header += [f"Δ cost ({search['cost']['unit']})", "final score"]
    gates = []
    for g in results["groups"]:
        row = [g["index"], ", ".join(g["sites"]), "yes" if keep[g["index"]] else "**removed**"]
        if search:
            row += [search["cost"]["delta"][g["index"]], search["scores"][g["index"]]]
        gates.append(row)
    pattern = [f"Keep-list (1 = keep): `{','.join(map(str, keep))}`"
               + (f" ({ft['source']})." if ft else f" (search, ratio {search['ratio']:g})."),
               Table(header, gates)]
    if ft:
        pattern.append(f"ReLU6 added after removed blocks: {', '.join(ft['final_acts']) or 'none'}. "
                       f"Distillation: {ft['distill'] or 'off'}; progressive removal: "
                       f"{ft['progressive'] or 'off'}.")
    pattern.append(Figure(PATTERN_PLOT, "pattern", lambda p: plot_pattern(results, p)))
    sections.append(Section("Pattern", pattern))

    if search:
        form = "λ Σ Δ (1 − s)" if search["cost_sign"] == "reduce" else "λ Σ Δ s (as released)"
        sections.append(Section("Search", [
            f"{search['epochs']} epochs, cost table `{search['cost']['kind']}`, regularizer "
            f"{form}, λ = {search['cost_weight']:g}.",
            Figure(SCORES_PLOT, "gate scores over the search", lambda p: plot_scores(search, p)),
            "Keep-lists by kept fraction (also in `keep_lists.json`):",
            Table(["ratio", "keep-list"],
                  [[r, f"`{','.join(map(str, v))}`"] for r, v in search["keep_lists"].items()])]))
    sections += merge_sections(results, before="dense")
    h, w = results["image_size"]
    return Report(f"depthshrinker: {results['model']} on {results['dataset']} ({h}x{w})", sections)


def _pattern(results: dict) -> list[int]:
    return results["finetune"]["keep"] if "finetune" in results else results["search"]["keep"]


def plot_scores(search: dict, path: Path) -> None:
    """Every gate's score over the search epochs; gates removed at the search ratio solid."""
    plt = pyplot()
    history = np.asarray(search["history"])
    keep = search["keep"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    cmap = plt.get_cmap("viridis")
    n = history.shape[1]
    for i in range(n):
        ax.plot(range(len(history)), history[:, i], color=cmap(i / max(n - 1, 1)),
                ls="--" if keep[i] else "-", lw=1.0 if keep[i] else 1.8, label=str(i))
    ax.axhspan(0, 1, color="0.93", zorder=0)
    ax.set_xlabel("search epoch")
    ax.set_ylabel("gate score s (higher: more removable)")
    ax.set_title(f"gate scores; solid: removed at ratio {search['ratio']:g}, dashed: kept",
                 fontsize=9)
    ax.legend(ncol=2, fontsize=6, title="gate", title_fontsize=7, loc="center left",
              bbox_to_anchor=(1.0, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pattern(results: dict, path: Path) -> None:
    """The chosen pattern: one bar per gate (its cost saving when the search ran, else 1),
    kept gates blue, removed orange."""
    plt = pyplot()
    keep = _pattern(results)
    search = results.get("search")
    values = search["cost"]["delta"] if search else [1.0] * len(keep)
    fig, ax = plt.subplots(figsize=(7.5, 3.0))
    colors = ["tab:blue" if k else "tab:orange" for k in keep]
    ax.bar(range(len(keep)), values, color=colors)
    ax.set_xticks(range(len(keep)))
    ax.set_xlabel("gate (forward order: stem, blocks, head)")
    ax.set_ylabel(f"Δ cost ({search['cost']['unit']})" if search else "")
    ax.set_title("pattern: blue kept, orange removed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
