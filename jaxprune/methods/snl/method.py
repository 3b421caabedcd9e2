"""SNL's search (α trained with an L1 penalty until the ReLU budget is met) and finetune
(binarized masks, weights trained with distillation); see the package doc."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.context import MethodResult, RunContext
from jaxprune.errors import UserError
from jaxprune.methods.distillation import Distillation, DistillHooks
from jaxprune.methods.fuse_export import export_torch
from jaxprune.methods.pretrain import original_model
from jaxprune.methods.snl import report
from jaxprune.methods.snl.masks import (binarize, mask_shapes, relu_count, relu_weights,
                                        set_masks)
from jaxprune.train import Trainer, evaluate_model, fetch, fit
from jaxprune.train.trainer import Hooks
from models.net import Net


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


def _search(ctx: RunContext, original: Net, m: Net, weights: dict, budget: int) -> dict:
    cfg, opts = ctx.cfg, ctx.cfg.method
    ckpt = ctx.checkpoints("search")
    if ckpt.latest() is not None:
        return ckpt.load(0, m)["search"]
    alphas = {s: np.asarray(m.layers[s].mask.get_value()) for s in weights}
    distill = Distillation(original, temperature=opts.temperature, kd_weight=1.0, ce_weight=1.0)
    train = dataclasses.replace(cfg.train, optimizer="adam", lr=opts.search_lr, schedule="constant",
                                weight_decay=0.0, grad_clip=None, epochs=opts.search_epochs)
    hooks = SNLHooks(alphas, opts.lam, distill, opts.alpha_lr_scale)
    trainer = Trainer(m, train, steps_per_epoch=ctx.data.steps_per_epoch(), mesh=ctx.mesh,
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

    ctx.log(f"snl search: {total:,} ReLUs per image, budget {budget:,} "
            f"({opts.granularity}-wise α, at most {opts.search_epochs} epochs)")
    records = fit(trainer, ctx.data, opts.search_epochs, journal=ctx.journal,
                  tag={"stage": "search"}, on_epoch=on_epoch)
    last = records[-1]
    history = [{"epoch": 0, "relus": total, "lam": opts.lam}] + [
        {"epoch": r["epoch"], "relus": r["relus"], "lam": r["lam"], "val_acc": r["val_acc"]}
        for r in records]
    set_masks(m, hooks.alpha(fetch(trainer.extra)))  # the masks lag the last update by one step
    test = trainer.evaluate(ctx.data.eval_batches("test"))
    result = {"history": history, "epochs": len(history) - 1, "relus": history[-1]["relus"],
              "reached": history[-1]["relus"] <= budget, "lam": last["lam_next"],
              "val_acc": last["val_acc"], "test_acc": test["acc"]}
    ckpt.save(0, m, {"search": result})  # the masks hold α
    return result


def _finetune(ctx: RunContext, original: Net, m: Net, weights: dict, budget: int) -> dict:
    cfg, opts = ctx.cfg, ctx.cfg.method
    ckpt = ctx.checkpoints("finetune")
    alphas = {s: np.asarray(m.layers[s].mask.get_value()) for s in weights}
    masks, forced = binarize(alphas, weights, opts.threshold, budget)
    set_masks(m, masks)
    if ckpt.latest() is not None:
        return ckpt.load(0, m)["finetune"]
    binary = evaluate_model(m, cfg.train, ctx.data, ctx.mesh)
    distill = Distillation(original, temperature=opts.temperature, kd_weight=1.0, ce_weight=1.0)
    trainer = Trainer(m, cfg.train, steps_per_epoch=ctx.data.steps_per_epoch(), mesh=ctx.mesh,
                      hooks=DistillHooks(distill))
    trainer.start_round()
    last = fit(trainer, ctx.data, cfg.train.epochs, journal=ctx.journal,
               tag={"stage": "finetune"})[-1]
    test = trainer.evaluate(ctx.data.eval_batches("test"))
    kept = {s: float(np.mean(v)) for s, v in masks.items()}
    result = {"relus": relu_count(masks, weights, 0.5), "forced_to_budget": forced,
              "binarized": {"val_acc": binary["val_acc"], "test_acc": binary["test_acc"]},
              "kept_fraction": kept, "epochs": cfg.train.epochs,
              "val_acc": last["val_acc"], "test_acc": test["acc"]}
    ckpt.save(0, m, {"finetune": result})
    return result


def run(ctx: RunContext) -> MethodResult:
    cfg, opts = ctx.cfg, ctx.cfg.method
    original = original_model(ctx, opts.pretrain_epochs)
    hw = ctx.image_size
    dense = evaluate_model(original, cfg.train, ctx.data, ctx.mesh)
    shapes = mask_shapes(original, hw, opts.granularity)
    weights = relu_weights(original, hw, shapes)
    total = sum(int(np.prod(shapes[s])) * weights[s] for s in shapes)
    budget = opts.relu_budget if opts.relu_budget is not None else int(opts.relu_fraction * total)
    m = nnx.clone(original)
    set_masks(m, {s: np.ones(shape, np.float32) for s, shape in shapes.items()})  # α = 1
    search = _search(ctx, original, m, weights, budget)
    finetune = _finetune(ctx, original, m, weights, budget)
    results = {"method": "snl", "model": cfg.model.name, "dataset": cfg.data.name,
               "image_size": list(hw), "granularity": opts.granularity,
               "relus_total": total, "budget": budget, "threshold": opts.threshold,
               "dense": dense, "search": search, "finetune": finetune}
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, *hw, m.spec.in_channels)))
    m.eval()
    try:
        results["export"] = export_torch(m, ctx.run_dir / "export", x, np.asarray(m(x)))
    except UserError as e:  # the masked model may not be expressible in torch: say why
        results["export"] = {"status": f"not exported: {e}"}
    return MethodResult(results, report.report(results))
