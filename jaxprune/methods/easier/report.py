"""EASIER's report: the rounds, the selected round, its plots, then the fused model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxprune.methods.fuse_export import merge_sections
from jaxprune.report import Figure, Report, Section, Table, fmt, pyplot

ENTROPY_PLOT, ACCURACY_PLOT = "entropy.png", "accuracy.png"


def report(results: dict) -> Report:
    rounds, sel = results["rounds"], results["selected"]
    sections = [Section("Rounds", [
        Table(["round", "sites linear", "linearized this round", "train acc", "val acc",
               "test acc", "lowest entropy left"],
              [[r["round"], f"{r['n_linear']}/{r['n_sites']}", ", ".join(r["new"]) or "–",
                r["train_acc"], r["val_acc"], r["test_acc"],
                min((h for s, h in r["entropy"].items() if s not in r["linearized"]),
                    default=None)]
               for r in rounds]),
        Figure(ENTROPY_PLOT, "entropy per site and round", lambda p: plot_entropy(results, p)),
        Figure(ACCURACY_PLOT, "accuracy against sites linearized",
               lambda p: plot_accuracy(results, p))])]
    sections.append(Section("Selected", [
        f"Round {sel['round']}: {sel['n_linear']} of {sel['n_sites']} sites linear, "
        f"validation {fmt(sel['val_acc'])} % ({sel['val_acc'] - rounds[0]['val_acc']:+.2f} "
        f"points against round 0; budget: at most {fmt(sel['acc_budget'])} lost), "
        f"test {fmt(sel['test_acc'])} %.",
        f"Stopped: {sel['stop']}.",
        "Linear sites: " + (", ".join(sel["linearized"]) or "none")]))
    if "diverged" in results:
        sections.append(Section("Diverged", [results["diverged"]["message"]]))
    sections += merge_sections(results, before="dense")
    return Report(f"easier: {results['model']} on {results['dataset']}", sections)


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
        for s in r["new"]:
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
    rounds, sel = results["rounds"], results["selected"]
    n = [r["n_linear"] for r in rounds]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label in (("val_acc", "validation"), ("test_acc", "test")):
        ax.plot(n, [r[key] for r in rounds], marker="o", label=label)
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
