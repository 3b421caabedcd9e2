"""EASIER's rounds: train, measure the entropy of every site, linearize the lowest, retrain
(see the package doc)."""
from __future__ import annotations

import time

from jaxprune.activation_sites import dense_copy, linearize, linearized
from jaxprune.context import MethodResult, RunContext
from jaxprune.methods.easier import report
from jaxprune.methods.easier.entropy import layer_entropy
from jaxprune.methods.easier.selection import select_round, select_sites, stop_reason
from jaxprune.methods.fuse_export import fuse_and_export
from jaxprune.methods.pretrain import original_model
from jaxprune.train import Diverged, Trainer, fit
from jaxprune.train.trainer import Hooks


class EntropyHooks(Hooks):
    """Every train step records each site's ON/OFF entropy; the epoch record holds the
    mean over the epoch's batches under "entropy"."""
    site_metric = "entropy"

    def site_value(self, on_frac):
        return layer_entropy(on_frac)


def run(ctx: RunContext) -> MethodResult:
    cfg, opts = ctx.cfg, ctx.cfg.method
    m = original_model(ctx, opts.pretrain_epochs)
    names = m.sites()
    ckpt = ctx.checkpoints("rounds")
    rounds: list[dict] = []
    if ckpt.latest() is not None:  # resume after the last finished round
        rounds = ckpt.load(ckpt.latest(), m)["rounds"]
        ctx.log(f"resuming after round {rounds[-1]['round']} from {ckpt.path(ckpt.latest())}")
    trainer = Trainer(m, cfg.train, steps_per_epoch=ctx.data.steps_per_epoch(), mesh=ctx.mesh,
                      hooks=EntropyHooks())
    diverged = None

    while not rounds or stop_reason(rounds, opts) is None:
        r = len(rounds)
        new = select_sites(rounds[-1]["entropy"], linearized(m)) if rounds else []
        linearize(m, new)
        t0 = time.perf_counter()
        trainer.start_round()
        try:
            # each round reads data epochs of its own, after the pretraining's
            last = fit(trainer, ctx.data, cfg.train.epochs, journal=ctx.journal, tag={"round": r},
                       epoch_offset=opts.pretrain_epochs + r * cfg.train.epochs)[-1]
        except Diverged as e:
            if not rounds:
                raise  # no round to select from
            diverged = {**e.record, "message": str(e)}
            ctx.log(f"round {r}: {e}")
            break
        test = trainer.evaluate(ctx.data.eval_batches("test"))
        done = linearized(m)
        rounds.append({"round": r, "new": new, "linearized": done, "n_linear": len(done),
                       "n_sites": len(names), "train_loss": last["train_loss"],
                       "train_acc": last["train_acc"], "val_loss": last["val_loss"],
                       "val_acc": last["val_acc"], "test_loss": test["loss"],
                       "test_acc": test["acc"], "entropy": last["entropy"],
                       "seconds": time.perf_counter() - t0})
        ckpt.save(r, m, {"rounds": rounds})
        ctx.log(f"round {r}: {len(done)}/{len(names)} sites linear, val {last['val_acc']:.2f} %, "
                f"test {test['acc']:.2f} %" + (f", linearized {', '.join(new)}" if new else ""))

    stop = (f"round {len(rounds)} diverged (non-finite loss in epoch {diverged['epoch']}, "
            f"step {diverged['step']})" if diverged else stop_reason(rounds, opts))
    chosen = select_round(rounds, opts.acc_budget)
    ckpt.load(chosen["round"], m)
    results = {
        "method": "easier", "model": cfg.model.name, "dataset": cfg.data.name, "sites": names,
        "pretrain_epochs": opts.pretrain_epochs, "rounds": rounds,
        "selected": {"round": chosen["round"], "linearized": chosen["linearized"],
                     "n_linear": chosen["n_linear"], "n_sites": chosen["n_sites"],
                     "val_acc": chosen["val_acc"], "test_acc": chosen["test_acc"],
                     "val_drop": rounds[0]["val_acc"] - chosen["val_acc"],
                     "acc_budget": opts.acc_budget, "stop": stop,
                     "checkpoint": str(ckpt.path(chosen["round"]))},
    }
    if diverged:
        results["diverged"] = diverged
    fused, _ = fuse_and_export(ctx, m, dense_copy(m), cost=opts.merge_cost,
                               latency=opts.latency, guard=True, rounds=opts.latency_rounds)
    results.update(fused)
    return MethodResult(results, report.report(results))
