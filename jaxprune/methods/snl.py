"""`method: snl` — Selective Network Linearization (Cho et al., ICML 2022), DepthShrinker's baseline.

Every activation site of the model gets trainable α, per channel `(C,)` or per
pixel `(H, W, C)` at the training image size, initialised at 1 and unclamped:
`y = α ⊙ act(x) + (1 − α) ⊙ x` (the site's mask). The search trains weights
and α with Adam (`search_lr`) on

    CE + T² KL(teacher ‖ student) at T = `temperature` + λ Σ ‖α‖₁

with the original network as the teacher. λ starts at `lam` and grows by
`lam_growth` after every epoch (from epoch `lam_from_epoch`) that did not lower
the ReLU count `Σ [α > threshold]` (each α counted for the activations it
covers). The search stops once the count is within the budget (`relu_budget`
ReLUs per image, or `relu_fraction` of the model's), or after `search_epochs`.
Then the masks are binarized (α > threshold; if the budget was not reached,
the largest α within it), frozen, and the weights finetuned with the `train:`
section and the same distillation.

Channel and pixel masks cut the ReLU count (what private inference pays for)
but make no layer linear as a whole, so nothing is fused.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import gates
from jaxprune.config import Config, MethodConfig
from jaxprune.errors import UserError
from jaxprune.merging.profiling import tensor_shapes
from jaxprune.methods import register
from jaxprune.methods.staged import (Distillation, DistillHooks, evaluate, export_torch,
                                     stage_checkpoints, start)
from jaxprune.report import pyplot, write_files
from jaxprune.train import Data, Journal, Trainer, fetch, fit
from jaxprune.train.trainer import Hooks
from models.net import Net

GRANULARITIES = ("channel", "pixel")
SEARCH_PLOT, SITES_PLOT = "relu_count.png", "sites.png"


@dataclasses.dataclass(frozen=True)
class SNLConfig(MethodConfig):
    name: str = "snl"
    granularity: str = "channel"        # channel: α of shape (C,); pixel: (H, W, C)
    relu_budget: int | None = None      # ReLUs per image to keep ...
    relu_fraction: float | None = 0.5   # ... or the fraction of the model's ReLUs to keep
    lam: float = 1e-5                   # initial weight of Σ ‖α‖₁
    lam_growth: float = 1.1             # λ factor after an epoch that did not lower the count
    lam_from_epoch: int = 5             # the first epoch (1-based) λ may grow after
    threshold: float = 1e-2             # an α above it keeps its ReLU
    search_epochs: int = 100            # the most search epochs; it stops at the budget
    search_lr: float = 1e-3             # Adam, on the weights and α
    alpha_lr_scale: float = 1.0         # α's step size relative to the weights' (1: the paper)
    temperature: float = 4.0            # distillation temperature (search and finetune)
    pretrain_epochs: int = 0            # dense training first (models without pretrained weights)


class SNLHooks(Hooks):
    """The search: α trained with the weights, written into the site masks each step;
    distillation plus λ Σ ‖α‖₁ (λ an aux value that grows without a retrace).

    The trained array is β = α / scale: Adam's step on β does not depend on the
    gradient's size, so α moves `scale` times the weights' step size."""
    metrics = ("kd", "l1")

    def __init__(self, alphas: dict[str, np.ndarray], lam: float, distill: Distillation,
                 scale: float = 1.0):
        self.alphas, self.lam, self.distill, self.scale = alphas, lam, distill, scale

    def extra_params(self):
        return {"beta": {k: jnp.asarray(v) / self.scale for k, v in self.alphas.items()}}

    def alpha(self, extra) -> dict:
        return {k: self.scale * b for k, b in extra["beta"].items()}

    def aux(self):
        return {"lam": np.float32(self.lam), **self.distill.aux()}

    def prepare(self, m, extra, aux, step, *, train):
        for site, a in self.alpha(extra).items():
            m.layers[site].mask.set_value(a)

    def loss(self, m, logits, batch, loss, extra, aux, step):
        total, kd = self.distill(logits, batch, aux)
        l1 = sum(jnp.sum(jnp.abs(a)) for a in self.alpha(extra).values())
        return total + aux["lam"] * l1, {"kd": kd, "l1": l1}


def mask_shapes(m: Net, hw, granularity: str) -> dict[str, tuple]:
    """α's shape per site: (C,) or (H, W, C) of the site's input at input size `hw`."""
    if granularity not in GRANULARITIES:
        raise UserError(f"method.granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    shapes = tensor_shapes(m, tuple(hw))
    inputs = dict(m.graph)
    out = {}
    for site in m.sites():
        shape = shapes[inputs[site][0]][1:]
        if len(shape) != 3:
            raise UserError(f"snl needs (H, W, C) activations; site {site} has shape {shape}")
        out[site] = shape[-1:] if granularity == "channel" else shape
    return out


def relu_weights(m: Net, hw, shapes: dict[str, tuple]) -> dict[str, int]:
    """How many activations one α covers at each site (H·W per channel α, 1 per pixel α)."""
    counts = gates.relu_counts(m, hw, list(shapes))
    return {s: counts[s] // int(np.prod(shapes[s])) for s in shapes}


def relu_count(alphas: dict[str, np.ndarray], weights: dict[str, int], threshold: float) -> int:
    """ReLUs per image kept by `alphas`: Σ [α > threshold] · (activations per α)."""
    return int(sum(int(np.sum(np.asarray(a) > threshold)) * weights[s] for s, a in alphas.items()))


def binarize(alphas: dict[str, np.ndarray], weights: dict[str, int], threshold: float,
             budget: int) -> tuple[dict[str, np.ndarray], bool]:
    """0/1 masks: α > threshold; when that keeps more than `budget` ReLUs, the largest α
    whose ReLUs fit in the budget instead. Returns (masks, whether the budget forced it)."""
    masks = {s: (np.asarray(a) > threshold).astype(np.float32) for s, a in alphas.items()}
    if relu_count(alphas, weights, threshold) <= budget:
        return masks, False
    sites = list(alphas)
    values = np.concatenate([np.asarray(alphas[s], np.float64).ravel() for s in sites])
    cost = np.concatenate([np.full(np.asarray(alphas[s]).size, weights[s]) for s in sites])
    order = np.argsort(-values, kind="stable")
    order = order[values[order] > threshold]
    chosen = order[np.cumsum(cost[order]) <= budget]
    flat = np.zeros(values.size, np.float32)
    flat[chosen] = 1.0
    out, start = {}, 0
    for s in sites:
        size = np.asarray(alphas[s]).size
        out[s] = flat[start:start + size].reshape(np.asarray(alphas[s]).shape)
        start += size
    return out, True


def set_masks(m: Net, masks: dict[str, np.ndarray]) -> None:
    for site, value in masks.items():
        m.layers[site].mask.set_value(jnp.asarray(value, jnp.float32))


def _check(opts: SNLConfig) -> None:
    if (opts.relu_budget is None) == (opts.relu_fraction is None):
        raise UserError("set exactly one of method.relu_budget (ReLUs per image) and "
                        "method.relu_fraction (fraction of the model's ReLUs); set the other to null")
    if opts.relu_fraction is not None and not 0.0 < opts.relu_fraction <= 1.0:
        raise UserError(f"method.relu_fraction must be in (0, 1], got {opts.relu_fraction}")
    if opts.relu_budget is not None and opts.relu_budget < 0:
        raise UserError(f"method.relu_budget must be >= 0, got {opts.relu_budget}")
    for key in ("lam", "search_lr", "alpha_lr_scale", "temperature"):
        if getattr(opts, key) <= 0:
            raise UserError(f"method.{key} must be positive, got {getattr(opts, key)}")
    if opts.lam_growth < 1.0 or opts.threshold < 0 or opts.search_epochs < 1:
        raise UserError("method.lam_growth must be >= 1, threshold >= 0, search_epochs >= 1")


def _search(cfg: Config, opts: SNLConfig, original: Net, m: Net, data: Data, mesh,
            run_dir: Path, journal: Journal, weights: dict, budget: int) -> dict:
    ckpt = stage_checkpoints(run_dir, "search")
    if ckpt.latest() is not None:
        return ckpt.load(0, m)["search"]
    alphas = {s: np.asarray(m.layers[s].mask.get_value()) for s in weights}
    distill = Distillation(original, temperature=opts.temperature, kd_weight=1.0, ce_weight=1.0)
    train = dataclasses.replace(cfg.train, optimizer="adam", lr=opts.search_lr, schedule="constant",
                                weight_decay=0.0, grad_clip=None, epochs=opts.search_epochs)
    hooks = SNLHooks(alphas, opts.lam, distill, opts.alpha_lr_scale)
    trainer = Trainer(m, train, steps_per_epoch=data.steps_per_epoch(), mesh=mesh, stats=False,
                      hooks=hooks)
    trainer.start_round()
    total = relu_count(alphas, weights, opts.threshold)

    def on_epoch(epoch: int, record: dict, earlier: list[dict]) -> bool:
        # λ and the count to beat come from the records, which a resumed run gets back too
        lam = earlier[-1]["lam_next"] if earlier else opts.lam
        previous = earlier[-1]["relus"] if earlier else total
        count = relu_count(hooks.alpha(fetch(trainer.extra)), weights, opts.threshold)
        grow = count > budget and epoch + 1 >= opts.lam_from_epoch and count >= previous
        record.update(relus=count, lam=lam, lam_next=lam * opts.lam_growth if grow else lam)
        if grow:
            trainer.set_aux(lam=np.float32(record["lam_next"]))
        return count <= budget

    print(f"snl search: {total:,} ReLUs per image, budget {budget:,} "
          f"({opts.granularity}-wise α, at most {opts.search_epochs} epochs)", flush=True)
    records = fit(trainer, data, opts.search_epochs, journal=journal, tag={"stage": "search"},
                  on_epoch=on_epoch)
    last = records[-1]
    history = [{"epoch": 0, "relus": total, "lam": opts.lam}] + [
        {"epoch": r["epoch"], "relus": r["relus"], "lam": r["lam"], "val_acc": r["val_acc"]}
        for r in records]
    set_masks(m, hooks.alpha(fetch(trainer.extra)))  # the masks lag the last update by one step
    test = trainer.evaluate(data.eval_batches("test"))
    result = {"history": history, "epochs": len(history) - 1, "relus": history[-1]["relus"],
              "reached": history[-1]["relus"] <= budget, "lam": last["lam_next"],
              "val_acc": last["val_acc"], "test_acc": test["acc"]}
    ckpt.save(0, m, {"search": result})  # the masks hold α
    return result


def _finetune(cfg: Config, opts: SNLConfig, original: Net, m: Net, data: Data, mesh,
              run_dir: Path, journal: Journal, weights: dict, budget: int) -> dict:
    ckpt = stage_checkpoints(run_dir, "finetune")
    alphas = {s: np.asarray(m.layers[s].mask.get_value()) for s in weights}
    masks, forced = binarize(alphas, weights, opts.threshold, budget)
    set_masks(m, masks)
    if ckpt.latest() is not None:
        return ckpt.load(0, m)["finetune"]
    binary = evaluate(m, cfg, data, mesh)
    distill = Distillation(original, temperature=opts.temperature, kd_weight=1.0, ce_weight=1.0)
    trainer = Trainer(m, cfg.train, steps_per_epoch=data.steps_per_epoch(), mesh=mesh,
                      stats=False, hooks=DistillHooks(distill))
    trainer.start_round()
    last = fit(trainer, data, cfg.train.epochs, journal=journal, tag={"stage": "finetune"})[-1]
    test = trainer.evaluate(data.eval_batches("test"))
    kept = {s: float(np.mean(v)) for s, v in masks.items()}
    result = {"relus": relu_count(masks, weights, 0.5), "forced_to_budget": forced,
              "binarized": {"val_acc": binary["val_acc"], "test_acc": binary["test_acc"]},
              "kept_fraction": kept, "epochs": cfg.train.epochs,
              "val_acc": last["val_acc"], "test_acc": test["acc"]}
    ckpt.save(0, m, {"finetune": result})
    return result


@register("snl", config=SNLConfig)
def run(cfg: Config, run_dir) -> dict:
    opts: SNLConfig = cfg.method
    _check(opts)
    run_dir = Path(run_dir)
    started = time.perf_counter()
    st = start(cfg, run_dir, opts.pretrain_epochs)
    mesh, data, hw, journal, original = st.mesh, st.data, st.hw, st.journal, st.original
    dense = evaluate(original, cfg, data, mesh)
    shapes = mask_shapes(original, hw, opts.granularity)
    weights = relu_weights(original, hw, shapes)
    total = sum(int(np.prod(shapes[s])) * weights[s] for s in shapes)
    budget = opts.relu_budget if opts.relu_budget is not None else int(opts.relu_fraction * total)
    m = nnx.clone(original)
    set_masks(m, {s: np.ones(shape, np.float32) for s, shape in shapes.items()})  # α = 1
    search = _search(cfg, opts, original, m, data, mesh, run_dir, journal, weights, budget)
    finetune = _finetune(cfg, opts, original, m, data, mesh, run_dir, journal, weights, budget)
    results = {"method": "snl", "model": cfg.model.name, "dataset": cfg.data.name,
               "image_size": list(hw), "granularity": opts.granularity,
               "relus_total": total, "budget": budget, "threshold": opts.threshold,
               "dense": dense, "search": search, "finetune": finetune}
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, *hw, m.spec.in_channels)))
    m.eval()
    try:
        results["export"] = export_torch(m, run_dir, x, np.asarray(m(x)))
    except UserError as e:  # the masked model may not be expressible in torch: say why
        results["export"] = {"status": f"not exported: {e}"}
    results["seconds"] = time.perf_counter() - started
    if jax.process_index() == 0:
        plot_search(results, run_dir / SEARCH_PLOT)
        plot_sites(results, run_dir / SITES_PLOT)
    write_files(run_dir, results, markdown(results))
    return results


# -- report ---------------------------------------------------------------------------------

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


def markdown(results: dict) -> str:
    s, f, d = results["search"], results["finetune"], results["dense"]
    total = results["relus_total"]

    def pct(n: int) -> str:
        return f"{n:,} ({100.0 * n / max(total, 1):.1f} %)"
    lines = [f"# snl: {results['model']} on {results['dataset']} "
             f"({results['image_size'][0]}x{results['image_size'][1]}, "
             f"{results['granularity']}-wise masks)", "",
             "| model | ReLUs per image | val acc (%) | test acc (%) |", "|---|---|---|---|",
             f"| dense (original) | {pct(total)} | {d['val_acc']:.2f} | {d['test_acc']:.2f} |",
             f"| search end (α) | {pct(s['relus'])} | {s['val_acc']:.2f} | {s['test_acc']:.2f} |",
             f"| binarized | {pct(f['relus'])} | {f['binarized']['val_acc']:.2f} | "
             f"{f['binarized']['test_acc']:.2f} |",
             f"| finetuned | {pct(f['relus'])} | {f['val_acc']:.2f} | {f['test_acc']:.2f} |", "",
             f"Budget: {pct(results['budget'])}; the search "
             + (f"reached it after {s['epochs']} epochs" if s["reached"]
                else f"stopped after {s['epochs']} epochs without reaching it, so the binarized "
                     "masks keep the largest α within the budget")
             + f" (final λ = {s['lam']:.3g}, threshold {results['threshold']:g}).", "",
             f"![ReLU count over the search]({SEARCH_PLOT})", "",
             f"![ReLUs kept per site]({SITES_PLOT})", "",
             "Channel and pixel masks enable no fusion: depth and MACs are unchanged.", ""]
    export = results.get("export")
    if export:
        lines += ["## Export", ""] + [f"{k}: {v}" for k, v in export.items()] + [""]
    lines += [f"Run time: {results['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)
