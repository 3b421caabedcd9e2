"""`method: depthshrinker` — learned removal of whole blocks' activations (Fu et al., ICML 2022).

Two stages on a MobileNetV2 (`mobilenet_v2`, torchvision or timm layout, any
width) with N = 19 gates (`jaxprune.gates`: stem, depthwise-separable block,
one shared gate per inverted residual, head):

1. **search**: gate scores trained with the weights; before every step the
   `k = floor(N * ratio)` smallest scores keep their ReLU6 (hard top-k,
   straight-through gates with torch's clamp gradient), plus the cost
   regularizer `cost_weight * Σ Δ (1 - s)` ("reduce", default) or the released
   `Σ Δ s` ("keep"); optional Gumbel exploration. Writes the keep-lists for
   the kept fractions 0.8 ... 0.1 to `keep_lists.json`.
2. **finetune**: from the *original* weights, with the keep-list from the
   search scores (`ratio`), from an earlier search run (`search_run`) or given
   (`act_list`, 19 values, 1 = keep). Every removed inverted residual gets a
   ReLU6 after its output (after the residual add: `final_act`). Optional
   self-distillation from the original network (`distill`, α, T) and
   progressive removal (the removed gates go a few at a time until
   `progressive_epochs`). Then `jaxprune.merge` fuses each removed block into
   one dense conv, the result is profiled against the dense network and
   exported to PyTorch.

    method:
      name: depthshrinker
      stage: both              # search | finetune | both
      ratio: 0.4               # kept fraction of the 19 gates
      cost: given              # given (lat_before/lat_after) | measured | relu
      cost_sign: reduce        # reduce | keep (as released)

Both stages train `train.epochs` epochs with the `train:` section (the paper:
SGD Nesterov, cosine to min_lr, wd 1e-5 without 1-D parameters, clip 5,
label smoothing 0.1). Each stage is checkpointed; rerunning the config resumes.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import gates
from jaxprune.config import Config, MethodConfig
from jaxprune.errors import UserError
from jaxprune.merging import COST_MODELS
from jaxprune.methods import register
from jaxprune.methods.staged import (Distillation, evaluate, fuse_and_export,
                                     stage_checkpoints, start)
from jaxprune.report import pyplot, write_files
from jaxprune.train import Data, Journal, Trainer, fetch, fit
from jaxprune.train.trainer import Hooks
from models.layers import Act
from models.net import Net

MODELS = ("mobilenet_v2", "mobilenet_v2_cifar")
STAGES = ("search", "finetune", "both")
PROGRESSIVE_MODES = ("forward", "backward")
KEEP_LISTS = "keep_lists.json"
SCORES_PLOT, PATTERN_PLOT = "gate_scores.png", "pattern.png"


@dataclasses.dataclass(frozen=True)
class DepthShrinkerConfig(MethodConfig):
    name: str = "depthshrinker"
    stage: str = "both"                # search | finetune | both
    ratio: float = 0.4                 # kept fraction of the gates (the released L0_SPARSITY)
    act_list: list[int] | None = None  # finetune from this keep-list (one 0/1 per gate)
    search_run: str | None = None      # run folder of an earlier search to take the keep-list from
    pretrain_epochs: int = 0           # dense training first (models without pretrained weights)
    cost: str = "given"                # given | measured | relu
    lat_before: list[float] = dataclasses.field(default_factory=lambda: list(gates.LAT_BEFORE))
    lat_after: list[float] = dataclasses.field(default_factory=lambda: list(gates.LAT_AFTER))
    cost_weight: float = 1e-4          # λ of the cost regularizer
    cost_sign: str = "reduce"          # reduce: λ Σ Δ (1 - s); keep: λ Σ Δ s (as released)
    cost_batch: int = 1                # batch size the measured table is timed at
    gumbel_epochs: int = 0             # search epochs that rank s + scale * Gumbel noise
    gumbel_scale: float = 1.0          # noise scale in the first epoch
    gumbel_decay: float = 0.95         # noise scale factor per epoch
    final_act: bool = True             # a ReLU6 after every removed inverted residual
    distill: bool = False              # finetune with self-distillation from the original
    distill_alpha: float = 0.7         # α · T² KL(teacher ‖ student) + (1 − α) · CE
    distill_temperature: float = 1.0
    progressive: bool = False          # remove the gates a few at a time during the finetune
    progressive_epochs: int | None = None  # all removed by this epoch; null: 2/3 of train.epochs
    progressive_mode: str = "forward"  # forward: the first blocks go first; backward: the last
    merge_cost: str = "macs"           # jaxprune.merge's cost model for the final fuse


# -- the compiled-step hooks ----------------------------------------------------------------

class SearchHooks(Hooks):
    """Stage 1: gate scores are trained; masks from their hard top-k; the cost term."""
    metrics = ("cost",)

    def __init__(self, gs: list[gates.Group], k: int, delta, weight: float, sign: str, seed: int):
        self.gs, self.k, self.weight, self.sign = gs, k, weight, sign
        self.delta = np.asarray(delta, np.float32)
        self.key = jax.random.PRNGKey(seed)
        self.scores = np.zeros(len(gs), np.float32)  # the released initialisation

    def extra_params(self):
        return {"scores": jnp.asarray(self.scores)}

    def extra_decay(self, extra):
        # The released gates are 0-d parameters: its "no decay on 1-D" rule misses them.
        return {"scores": True}

    def aux(self):
        return {"noise": np.float32(0.0), "key": self.key}

    def keep(self, scores, aux, step, train: bool):
        rank = scores
        if train:  # exploration; its scale is 0 once the Gumbel epochs are over
            rank = scores + aux["noise"] * gates.gumbel(jax.random.fold_in(aux["key"], step),
                                                        scores.shape)
        return gates.keep_smallest(jax.lax.stop_gradient(rank), self.k)

    def prepare(self, m, extra, aux, step, *, train):
        s = extra["scores"]
        gates.set_group_masks(m, self.gs, gates.gate_masks(s, self.keep(s, aux, step, train)))

    def loss(self, m, logits, batch, loss, extra, aux, step):
        cost = gates.cost_penalty(extra["scores"], self.delta, self.sign)
        return loss + self.weight * cost, {"cost": cost}


def apply_keep(m: Net, gs: list[gates.Group], finals: dict[int, str], keep) -> None:
    """Masks of a keep-list: the gates' sites = keep, a removed block's final ReLU6 = 1 - keep."""
    gates.set_group_masks(m, gs, keep)
    for index, name in finals.items():
        m.layers[name].mask.set_value(jnp.asarray(1.0 - keep[index], jnp.float32))


class KeepHooks(Hooks):
    """Stage 2: the keep-list is an aux value (progressive removal changes it between
    epochs without a retrace); optional distillation from the original network."""

    def __init__(self, gs: list[gates.Group], finals: dict[int, str], keep,
                 distill: Distillation | None):
        self.gs, self.finals, self.distill = gs, finals, distill
        self.keep0 = np.asarray(keep, np.float32)
        self.metrics = ("kd",) if distill is not None else ()

    def aux(self):
        return {"keep": self.keep0, **(self.distill.aux() if self.distill else {})}

    def prepare(self, m, extra, aux, step, *, train):
        apply_keep(m, self.gs, self.finals, aux["keep"])

    def loss(self, m, logits, batch, loss, extra, aux, step):
        if self.distill is None:
            return loss, {}
        total, kd = self.distill(logits, batch, aux)
        return total, {"kd": kd}


def progressive_keep(keep, epoch: int, until: int, mode: str) -> np.ndarray:
    """The keep-list in force in `epoch` under progressive removal (the released rule):
    the R removed gates go one per `until // (R - 1)` epochs, the first at epoch 0,
    in forward or backward order; when `until` is shorter than R - 1 epochs, several
    go per epoch, so that all are gone by epoch `until` either way."""
    keep = np.asarray(keep, np.float32)
    removed = [i for i, v in enumerate(keep) if v == 0]
    r = len(removed)
    if not removed:
        return keep
    if until <= 0 or r == 1:
        n = r
    elif until >= r - 1:
        n = min(epoch // (until // (r - 1)) + 1, r)
    else:
        n = min(1 + epoch * (r - 1) // until, r)
    gone = removed[:n] if mode == "forward" else removed[len(removed) - n:]
    out = np.ones_like(keep)
    out[gone] = 0.0
    return out


# -- stages ---------------------------------------------------------------------------------

def _check(cfg: Config, opts: DepthShrinkerConfig) -> None:
    if cfg.model.name not in MODELS:
        raise UserError(f"depthshrinker's 19 gates are defined on MobileNetV2: model.name must be "
                        f"one of {list(MODELS)}, got {cfg.model.name!r}")
    choices = {"stage": (opts.stage, STAGES), "cost": (opts.cost, gates.COST_KINDS),
               "cost_sign": (opts.cost_sign, gates.COST_SIGNS),
               "progressive_mode": (opts.progressive_mode, PROGRESSIVE_MODES)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"method.{key} must be one of {list(allowed)}, got {value!r}")
    if opts.merge_cost not in COST_MODELS:
        raise UserError(f"method.merge_cost must be one of {list(COST_MODELS)}, got {opts.merge_cost!r}")
    if not 0.0 <= opts.ratio <= 1.0:
        raise UserError(f"method.ratio is the kept fraction of the gates, in [0, 1]; got {opts.ratio}")
    if not 0.0 <= opts.distill_alpha <= 1.0:
        raise UserError(f"method.distill_alpha must be in [0, 1], got {opts.distill_alpha}")
    if opts.cost_weight < 0 or opts.gumbel_scale < 0 or opts.gumbel_epochs < 0:
        raise UserError("method.cost_weight, gumbel_scale and gumbel_epochs must be >= 0")
    if opts.stage == "both" and opts.act_list is not None:
        raise UserError("method.stage 'both' takes its keep-list from its own search; drop "
                        "method.act_list, or set method.stage: finetune to finetune from it")
    if opts.stage == "finetune" and opts.act_list is None and opts.search_run is None:
        raise UserError("method.stage 'finetune' needs a keep-list: set method.act_list (one 0/1 "
                        "per gate) or method.search_run (the run folder of a search)")
    if opts.progressive and _progressive_until(cfg, opts) >= cfg.train.epochs:
        raise UserError(f"method.progressive_epochs ({_progressive_until(cfg, opts)}) must be less "
                        f"than train.epochs ({cfg.train.epochs}): the last epoch trains the final pattern")


def _progressive_until(cfg: Config, opts: DepthShrinkerConfig) -> int:
    if opts.progressive_epochs is not None:
        return opts.progressive_epochs
    return (2 * cfg.train.epochs) // 3  # the released 120 of 180 epochs


def _search(cfg: Config, opts: DepthShrinkerConfig, original: Net, gs, data: Data, mesh,
            run_dir: Path, journal: Journal, hw) -> dict:
    ckpt = stage_checkpoints(run_dir, "search")
    m = nnx.clone(original)
    if ckpt.latest() is not None:
        return ckpt.load(0, m)["search"]
    table = gates.cost_table(opts.cost, original, hw, before=opts.lat_before,
                             after=opts.lat_after, batch=opts.cost_batch)
    k = gates.keep_count(len(gs), opts.ratio)
    hooks = SearchHooks(gs, k, table.delta, opts.cost_weight, opts.cost_sign, cfg.seed)
    trainer = Trainer(m, cfg.train, steps_per_epoch=data.steps_per_epoch(), mesh=mesh,
                      stats=False, hooks=hooks)
    trainer.start_round()

    def noise(epoch: int) -> np.float32:
        on = epoch < opts.gumbel_epochs
        return np.float32(opts.gumbel_scale * opts.gumbel_decay ** epoch if on else 0.0)

    def on_epoch(epoch: int, record: dict, earlier: list[dict]) -> None:
        scores = fetch(trainer.extra)["scores"]
        record["scores"] = scores.tolist()
        record["keep"] = [int(v) for v in np.asarray(gates.keep_smallest(scores, k))]
        trainer.set_aux(noise=noise(epoch + 1))

    trainer.set_aux(noise=noise(0))
    form = "λ Σ Δ (1 − s), removes the gates that save most" if opts.cost_sign == "reduce" \
        else "λ Σ Δ s as released, keeps the gates that save most"
    print(f"depthshrinker search: keep {k} of {len(gs)} gates; cost {table.kind} ({table.unit}), "
          f"regularizer {form}, λ = {opts.cost_weight:g}", flush=True)
    records = fit(trainer, data, cfg.train.epochs, journal=journal, tag={"stage": "search"},
                  on_epoch=on_epoch)
    last = records[-1]
    test = trainer.evaluate(data.eval_batches("test"))
    history = [hooks.scores.tolist()] + [r["scores"] for r in records]
    scores = history[-1]
    ratios = sorted(set(gates.RATIOS) | {opts.ratio}, reverse=True)
    lists = gates.keep_lists(scores, ratios)
    result = {"ratio": opts.ratio, "k": k, "epochs": cfg.train.epochs, "cost": table.as_dict(),
              "cost_weight": opts.cost_weight, "cost_sign": opts.cost_sign,
              "gumbel": {"epochs": opts.gumbel_epochs, "scale": opts.gumbel_scale,
                         "decay": opts.gumbel_decay},
              "scores": scores, "history": history, "keep_lists": lists,
              "keep": lists[f"{opts.ratio:g}"], "val_acc": last["val_acc"],
              "test_acc": test["acc"]}
    if jax.process_index() == 0:
        (run_dir / KEEP_LISTS).write_text(json.dumps(
            {"scores": scores, "keep_lists": lists, "ratio": opts.ratio}, indent=1))
    ckpt.save(0, m, {"search": result})
    return result


def _keep_list(opts: DepthShrinkerConfig, n: int, search: dict | None) -> tuple[np.ndarray, str]:
    """(keep-list, where it came from) for the finetune."""
    if opts.act_list is not None:
        return gates.parse_keep_list(opts.act_list, n, "method.act_list"), "method.act_list"
    if search is None:
        path = Path(opts.search_run) / KEEP_LISTS
        if not path.is_file():
            raise UserError(f"method.search_run: {path} not found; point it at the run folder of "
                            f"a finished depthshrinker search")
        scores = json.loads(path.read_text())["scores"]
        source = f"search scores of {opts.search_run}"
    else:
        scores, source = search["scores"], "search scores of this run"
    if len(scores) != n:
        raise UserError(f"the search scores have {len(scores)} gates, this model {n}")
    keep = np.asarray(gates.keep_smallest(np.asarray(scores, np.float32),
                                          gates.keep_count(n, opts.ratio)))
    return keep, f"{source}, ratio {opts.ratio:g}"


def _finetune(cfg: Config, opts: DepthShrinkerConfig, original: Net, gs, keep: np.ndarray,
              source: str, data: Data, mesh, run_dir: Path, journal: Journal):
    student = nnx.clone(original)
    finals = {}
    if opts.final_act:
        for g in gs:
            if keep[g.index] == 0 and g.final is not None:
                finals[g.index] = student.insert_after(g.final, gates.final_act_name(student, g),
                                                       Act("relu6"))
    ckpt = stage_checkpoints(run_dir, "finetune")
    if ckpt.latest() is not None:
        return student, ckpt.load(0, student)["finetune"]
    until = _progressive_until(cfg, opts)

    def schedule(epoch: int) -> np.ndarray:
        return progressive_keep(keep, epoch, until, opts.progressive_mode) if opts.progressive else keep

    distill = (Distillation(original, temperature=opts.distill_temperature,
                            kd_weight=opts.distill_alpha, ce_weight=1.0 - opts.distill_alpha)
               if opts.distill else None)
    hooks = KeepHooks(gs, finals, schedule(0), distill)
    trainer = Trainer(student, cfg.train, steps_per_epoch=data.steps_per_epoch(), mesh=mesh,
                      stats=False, hooks=hooks)
    trainer.start_round()

    def on_epoch(epoch: int, record: dict, earlier: list[dict]) -> None:
        record["removed"] = int(np.sum(schedule(epoch) == 0))
        trainer.set_aux(keep=schedule(epoch + 1))

    removed = [g.index for g in gs if keep[g.index] == 0]
    print(f"depthshrinker finetune: {len(removed)} of {len(gs)} gates removed ({source}), "
          f"{len(finals)} ReLU6 added after removed blocks", flush=True)
    last = fit(trainer, data, cfg.train.epochs, journal=journal, tag={"stage": "finetune"},
               on_epoch=on_epoch)[-1]
    trainer.set_aux(keep=keep)
    test = trainer.evaluate(data.eval_batches("test"))
    apply_keep(student, gs, finals, keep)
    result = {"keep": [int(v) for v in keep], "source": source, "removed_gates": removed,
              "removed_sites": [s for g in gs if keep[g.index] == 0 for s in g.sites],
              "final_acts": list(finals.values()), "epochs": cfg.train.epochs,
              "distill": ({"alpha": opts.distill_alpha, "temperature": opts.distill_temperature}
                          if opts.distill else None),
              "progressive": ({"until": until, "mode": opts.progressive_mode}
                              if opts.progressive else None),
              "val_acc": last["val_acc"], "test_acc": test["acc"]}
    ckpt.save(0, student, {"finetune": result})
    return student, result


@register("depthshrinker", config=DepthShrinkerConfig)
def run(cfg: Config, run_dir) -> dict:
    opts: DepthShrinkerConfig = cfg.method
    _check(cfg, opts)
    run_dir = Path(run_dir)
    started = time.perf_counter()
    st = start(cfg, run_dir, opts.pretrain_epochs)
    mesh, data, hw, journal, original = st.mesh, st.data, st.hw, st.journal, st.original
    gs = gates.groups(original)
    results = {"method": "depthshrinker", "model": cfg.model.name, "dataset": cfg.data.name,
               "image_size": list(hw),
               "groups": [{"index": g.index, "sites": list(g.sites)} for g in gs],
               "dense": evaluate(original, cfg, data, mesh)}
    search = None
    if opts.stage in ("search", "both"):
        search = results["search"] = _search(cfg, opts, original, gs, data, mesh, run_dir, journal, hw)
    if opts.stage in ("finetune", "both"):
        keep, source = _keep_list(opts, len(gs), search)
        student, results["finetune"] = _finetune(cfg, opts, original, gs, keep, source, data,
                                                 mesh, run_dir, journal)
        fused, small = fuse_and_export(student, original, run_dir, hw, cost=opts.merge_cost)
        results.update(fused)
        results["fused"] = evaluate(small, cfg, data, mesh, splits=("test",))
    results["seconds"] = time.perf_counter() - started
    if jax.process_index() == 0:
        if search is not None:
            plot_scores(search, run_dir / SCORES_PLOT)
        if "finetune" in results or search is not None:
            plot_pattern(results, run_dir / PATTERN_PLOT)
    write_files(run_dir, results, markdown(results))
    return results


# -- report ---------------------------------------------------------------------------------

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
    ax.set_xlabel("gate (0 stem, 1 DS block, 2-17 inverted residuals, 18 head)")
    ax.set_ylabel(f"Δ cost ({search['cost']['unit']})" if search else "")
    ax.set_title("pattern: blue kept, orange removed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2e}" if v and abs(v) < 10 ** -digits else f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_f(v) for v in row) + " |" for row in rows])


def markdown(results: dict) -> str:
    lines = [f"# depthshrinker: {results['model']} on {results['dataset']} "
             f"({results['image_size'][0]}x{results['image_size'][1]})", "", "## Accuracy", ""]
    rows = [["dense (original)", results["dense"]["val_acc"], results["dense"]["test_acc"]]]
    search, ft = results.get("search"), results.get("finetune")
    if search:
        rows.append([f"search: gated, {search['k']} of {len(search['keep'])} gates kept",
                     search["val_acc"], search["test_acc"]])
    if ft:
        rows.append([f"finetuned, {len(ft['keep']) - len(ft['removed_gates'])} of "
                     f"{len(ft['keep'])} gates kept", ft["val_acc"], ft["test_acc"]])
        rows.append(["fused", None, results["fused"]["test_acc"]])
    lines += _table(["model", "val acc (%)", "test acc (%)"], rows) + [""]
    keep = _pattern(results)
    lines += ["## Pattern", "", f"Keep-list (1 = keep): `{','.join(map(str, keep))}`"
              + (f" ({ft['source']})." if ft else f" (search, ratio {search['ratio']:g})."), ""]
    groups = results["groups"]
    header = ["gate", "sites", "kept"]
    if search:
        header += [f"Δ cost ({search['cost']['unit']})", "final score"]
    table = []
    for g in groups:
        row = [g["index"], ", ".join(g["sites"]), "yes" if keep[g["index"]] else "**removed**"]
        if search:
            row += [search["cost"]["delta"][g["index"]], search["scores"][g["index"]]]
        table.append(row)
    lines += _table(header, table) + [""]
    if ft:
        lines += [f"ReLU6 added after removed blocks: {', '.join(ft['final_acts']) or 'none'}.",
                  f"Distillation: {ft['distill'] or 'off'}; progressive removal: "
                  f"{ft['progressive'] or 'off'}.", ""]
    if search:
        form = "λ Σ Δ (1 − s)" if search["cost_sign"] == "reduce" else "λ Σ Δ s (as released)"
        lines += [f"Search: {search['epochs']} epochs, cost table `{search['cost']['kind']}`, "
                  f"regularizer {form}, λ = {search['cost_weight']:g}.", "",
                  f"![gate scores over the search]({SCORES_PLOT})", ""]
        lines += ["Keep-lists by kept fraction (also in `keep_lists.json`):", ""]
        lines += _table(["ratio", "keep-list"],
                        [[r, f"`{','.join(map(str, v))}`"] for r, v in search["keep_lists"].items()])
        lines.append("")
    lines += [f"![pattern]({PATTERN_PLOT})", ""]
    merge = results.get("merge")
    if merge:
        lines += ["## Fused model against the dense original", ""]
        rows = [[label, merge[f"{key}_before"], merge[f"{key}_after"],
                 f"{merge[f'{key}_after'] / merge[f'{key}_before']:.2f}"]
                for label, key in (("depth (weight layers)", "depth"), ("parameters", "params"),
                                   ("MACs per image", "macs"))]
        for runtime, ms in merge["latency_ms_before"].items():
            after = merge["latency_ms_after"][runtime]
            name, batch = runtime.split("@")
            rows.append([f"latency, {name}, batch {batch} (ms)", ms, after,
                         f"{after / ms:.2f} (speed-up {ms / after:.2f}x)"])
        lines += _table(["", "dense", "fused", "fused / dense"], rows)
        lines += ["", f"Latency measured on this machine ({merge['latency_device']}): JAX jit "
                  f"and the exported torch module in eager mode, median of repeated runs."]
        lines += ["", f"Fused vs finetuned model: max |Δ logits| = {merge['max_abs_diff']:.2e} "
                  f"on random inputs; {len(merge['fused'])} layers fused, cost model "
                  f"`{merge['cost_model']}`.", ""]
    export = results.get("export")
    if export:
        lines += ["## Export", ""] + [f"{k}: {_f(v)}" for k, v in export.items()] + [""]
    lines += [f"Run time: {results['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)
