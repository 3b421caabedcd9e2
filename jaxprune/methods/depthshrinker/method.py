"""DepthShrinker's two stages, search and finetune, then fuse and export (see the package doc)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.context import MethodResult, RunContext
from jaxprune.errors import UserError
from jaxprune.methods.depthshrinker import KEEP_LISTS, DepthShrinkerConfig, gates, report
from jaxprune.methods.depthshrinker.cost import cost_table
from jaxprune.methods.depthshrinker.groups import Group, final_act_name, groups, set_group_masks
from jaxprune.methods.distillation import Distillation
from jaxprune.methods.fuse_export import fuse_and_export
from jaxprune.methods.pretrain import original_model
from jaxprune.train import Trainer, evaluate_model, fetch, fit
from jaxprune.train.trainer import Hooks
from models.layers import Act
from models.net import Net


# -- the compiled-step hooks ----------------------------------------------------------------

class SearchHooks(Hooks):
    """Stage 1: gate scores are trained; masks from their hard top-k; the cost term."""
    metrics = ("cost",)

    def __init__(self, gs: list[Group], k: int, delta, weight: float, sign: str, seed: int):
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
        set_group_masks(m, self.gs, gates.gate_masks(s, self.keep(s, aux, step, train)))

    def loss(self, m, logits, batch, loss, extra, aux, step):
        cost = gates.cost_penalty(extra["scores"], self.delta, self.sign)
        return loss + self.weight * cost, {"cost": cost}


def apply_keep(m: Net, gs: list[Group], finals: dict[int, str], keep) -> None:
    """Masks of a keep-list: the gates' sites = keep, a removed block's final ReLU6 = 1 - keep."""
    set_group_masks(m, gs, keep)
    for index, name in finals.items():
        m.layers[name].mask.set_value(jnp.asarray(1.0 - keep[index], jnp.float32))


class KeepHooks(Hooks):
    """Stage 2: the keep-list is an aux value (progressive removal changes it between
    epochs without a retrace); optional distillation from the original network."""

    def __init__(self, gs: list[Group], finals: dict[int, str], keep,
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

def _search(ctx: RunContext, original: Net, gs: list[Group]) -> dict:
    cfg, opts = ctx.cfg, ctx.cfg.method
    ckpt = ctx.checkpoints("search")
    m = nnx.clone(original)
    if ckpt.latest() is not None:
        return ckpt.load(0, m)["search"]
    table = cost_table(opts.cost, original, ctx.image_size, before=opts.lat_before,
                       after=opts.lat_after, batch=opts.cost_batch)
    k = gates.keep_count(len(gs), opts.ratio)
    hooks = SearchHooks(gs, k, table.delta, opts.cost_weight, opts.cost_sign, cfg.seed)
    trainer = Trainer(m, cfg.train, steps_per_epoch=ctx.data.steps_per_epoch(), mesh=ctx.mesh,
                      hooks=hooks)
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
    ctx.log(f"depthshrinker search: keep {k} of {len(gs)} gates; cost {table.kind} "
            f"({table.unit}), regularizer {form}, λ = {opts.cost_weight:g}")
    records = fit(trainer, ctx.data, cfg.train.epochs, journal=ctx.journal,
                  tag={"stage": "search"}, on_epoch=on_epoch)
    last = records[-1]
    test = trainer.evaluate(ctx.data.eval_batches("test"))
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
    ctx.write_json(KEEP_LISTS, {"scores": scores, "keep_lists": lists, "ratio": opts.ratio})
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


def _finetune(ctx: RunContext, original: Net, gs: list[Group], keep: np.ndarray,
              source: str) -> tuple[Net, dict]:
    cfg, opts = ctx.cfg, ctx.cfg.method
    student = nnx.clone(original)
    finals = {}
    if opts.final_act:
        for g in gs:
            if keep[g.index] == 0 and g.final is not None:
                finals[g.index] = student.insert_after(g.final, final_act_name(g), Act("relu6"))
    ckpt = ctx.checkpoints("finetune")
    if ckpt.latest() is not None:
        return student, ckpt.load(0, student)["finetune"]
    until = opts.progressive_until(cfg)

    def schedule(epoch: int) -> np.ndarray:
        return progressive_keep(keep, epoch, until, opts.progressive_mode) if opts.progressive else keep

    distill = (Distillation(original, temperature=opts.distill_temperature,
                            kd_weight=opts.distill_alpha, ce_weight=1.0 - opts.distill_alpha)
               if opts.distill else None)
    hooks = KeepHooks(gs, finals, schedule(0), distill)
    trainer = Trainer(student, cfg.train, steps_per_epoch=ctx.data.steps_per_epoch(),
                      mesh=ctx.mesh, hooks=hooks)
    trainer.start_round()

    def on_epoch(epoch: int, record: dict, earlier: list[dict]) -> None:
        record["removed"] = int(np.sum(schedule(epoch) == 0))
        trainer.set_aux(keep=schedule(epoch + 1))

    removed = [g.index for g in gs if keep[g.index] == 0]
    ctx.log(f"depthshrinker finetune: {len(removed)} of {len(gs)} gates removed ({source}), "
            f"{len(finals)} ReLU6 added after removed blocks")
    last = fit(trainer, ctx.data, cfg.train.epochs, journal=ctx.journal,
               tag={"stage": "finetune"}, on_epoch=on_epoch)[-1]
    trainer.set_aux(keep=keep)
    test = trainer.evaluate(ctx.data.eval_batches("test"))
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


def run(ctx: RunContext) -> MethodResult:
    cfg, opts = ctx.cfg, ctx.cfg.method
    original = original_model(ctx, opts.pretrain_epochs)
    gs = groups(original)
    results = {"method": "depthshrinker", "model": cfg.model.name, "dataset": cfg.data.name,
               "image_size": list(ctx.image_size),
               "groups": [{"index": g.index, "sites": list(g.sites)} for g in gs],
               "dense": evaluate_model(original, cfg.train, ctx.data, ctx.mesh)}
    search = None
    if opts.stage in ("search", "both"):
        search = results["search"] = _search(ctx, original, gs)
    if opts.stage in ("finetune", "both"):
        keep, source = _keep_list(opts, len(gs), search)
        student, results["finetune"] = _finetune(ctx, original, gs, keep, source)
        fused, small = fuse_and_export(ctx, student, original, cost=opts.merge_cost,
                                       latency=opts.latency)
        results.update(fused)
        results["fused"] = evaluate_model(small, cfg.train, ctx.data, ctx.mesh, splits=("test",))
    return MethodResult(results, report.report(results))
