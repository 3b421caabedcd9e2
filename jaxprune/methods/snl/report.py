"""SNL's report: ReLU counts and accuracy of each stage, the search, the masks per site."""
from __future__ import annotations

from pathlib import Path

from jaxprune.methods.fuse_export import merge_sections
from jaxprune.report import Figure, Report, Section, Table, pyplot

SEARCH_PLOT, SITES_PLOT = "relu_count.png", "sites.png"


def report(results: dict) -> Report:
    s, f, d = results["search"], results["finetune"], results["dense"]
    total = results["relus_total"]

    def pct(n: int) -> str:
        return f"{n:,} ({100.0 * n / max(total, 1):.1f} %)"
    rows = [["dense (original)", pct(total), d["val_acc"], d["test_acc"]],
            ["search end (α)", pct(s["relus"]), s["val_acc"], s["test_acc"]],
            ["binarized", pct(f["relus"]), f["binarized"]["val_acc"], f["binarized"]["test_acc"]],
            ["finetuned", pct(f["relus"]), f["val_acc"], f["test_acc"]]]
    reached = (f"reached it after {s['epochs']} epochs" if s["reached"]
               else f"stopped after {s['epochs']} epochs without reaching it, so the binarized "
                    "masks keep the largest α within the budget")
    sections = [Section("ReLUs and accuracy", [
        Table(["model", "ReLUs per image", "val acc (%)", "test acc (%)"], rows),
        f"Budget: {pct(results['budget'])}; the search {reached} (final λ = {s['lam']:.3g}, "
        f"threshold {results['threshold']:g}).",
        Figure(SEARCH_PLOT, "ReLU count over the search", lambda p: plot_search(results, p)),
        Figure(SITES_PLOT, "ReLUs kept per site", lambda p: plot_sites(results, p)),
        "Channel and pixel masks enable no fusion: depth and MACs are unchanged."])]
    sections += merge_sections(results, before="dense")
    h, w = results["image_size"]
    return Report(f"snl: {results['model']} on {results['dataset']} ({h}x{w}, "
                  f"{results['granularity']}-wise masks)", sections)


def plot_search(results: dict, path: Path) -> None:
    """ReLU count per search epoch against the budget, and λ."""
    plt = pyplot()
    h = results["search"]["history"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot([r["epoch"] for r in h], [r["relus"] for r in h], marker="o", label="ReLUs kept")
    ax.axhline(results["budget"], ls="--", c="0.4", label="budget")
    ax.set_xlabel("search epoch")
    ax.set_ylabel("ReLUs per image")
    lam = ax.twinx()
    lam.plot([r["epoch"] for r in h], [r["lam"] for r in h], c="tab:red", lw=1, label="λ")
    lam.set_yscale("log")
    lam.set_ylabel("λ", color="tab:red")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sites(results: dict, path: Path) -> None:
    """Fraction of each site's ReLUs kept after binarization."""
    plt = pyplot()
    kept = results["finetune"]["kept_fraction"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(kept)), 3.6))
    ax.bar(range(len(kept)), list(kept.values()))
    ax.set_xticks(range(len(kept)), list(kept), rotation=90, fontsize=6)
    ax.set_ylabel("fraction of ReLUs kept")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
