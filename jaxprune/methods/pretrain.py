"""The network a method starts from and distills from, and a checkpointed training stage.

`original_model`: the config's model, from `model.pretrained` when given, then
trained densely for `pretrain_epochs` when asked (the small configs have no
pretrained weights), as stage `dense`. `train_stage` trains a model as one named
stage, checkpointed, so a rerun resumes (`dense`, LayerMerge's `finetune`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from jaxprune.context import RunContext
from jaxprune.train import Trainer, fit
from models.net import Net


def train_stage(ctx: RunContext, m: Net, stage: str, epochs: int, *,
                summary: Callable[[Trainer, dict], dict], hooks=None,
                epoch_offset: int = 0) -> dict:
    """Train `m` in place for `epochs` epochs as stage `stage`, the learning-rate schedule
    spanning the stage; returns `summary(trainer, last epoch's record)`, saved with the
    weights: a rerun loads both and trains nothing. `hooks`: the trainer's (e.g.
    `DistillHooks`); `epoch_offset` varies the data order from an earlier stage's."""
    ckpt = ctx.checkpoints(stage)
    if ckpt.latest() is not None:
        return {k: v for k, v in ckpt.load(0, m).items() if k != "stage"}
    train = dataclasses.replace(ctx.cfg.train, epochs=epochs)
    trainer = Trainer(m, train, steps_per_epoch=ctx.data.steps_per_epoch(), mesh=ctx.mesh,
                      hooks=hooks)
    trainer.start_round()
    last = fit(trainer, ctx.data, epochs, journal=ctx.journal, tag={"stage": stage},
               epoch_offset=epoch_offset)[-1]
    result = summary(trainer, last)
    # the layout the dense stage has always been saved in, so earlier run folders resume
    ckpt.save(0, m, {"stage": stage, **result})
    return result


def original_model(ctx: RunContext, pretrain_epochs: int) -> Net:
    m = ctx.build_model()
    if pretrain_epochs:
        train_stage(ctx, m, "dense", pretrain_epochs,
                    summary=lambda trainer, last: {"epochs": pretrain_epochs})
    return m
