"""The network a two-stage method (DepthShrinker, SNL) starts from and distills from.

The config's model, from `model.pretrained` when given, then trained densely
for `pretrain_epochs` when asked (the small configs have no pretrained
weights); that training is checkpointed as stage `dense`, so a rerun resumes.
"""
from __future__ import annotations

import dataclasses

from jaxprune.context import RunContext
from jaxprune.train import Trainer, fit
from models.net import Net


def original_model(ctx: RunContext, pretrain_epochs: int) -> Net:
    m = ctx.build_model()
    if not pretrain_epochs:
        return m
    ckpt = ctx.checkpoints("dense")
    if ckpt.latest() is not None:
        ckpt.load(0, m)
        return m
    # the schedule spans the stage it trains
    train = dataclasses.replace(ctx.cfg.train, epochs=pretrain_epochs)
    trainer = Trainer(m, train, steps_per_epoch=ctx.data.steps_per_epoch(), mesh=ctx.mesh)
    trainer.start_round()
    fit(trainer, ctx.data, pretrain_epochs, journal=ctx.journal, tag={"stage": "dense"})
    ckpt.save(0, m, {"stage": "dense", "epochs": pretrain_epochs})
    return m
