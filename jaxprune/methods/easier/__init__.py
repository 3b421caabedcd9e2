"""`method: easier` — entropy-based depth reduction (Quétu et al., ECML PKDD 2024).

Round 0 trains the dense model. Every following round linearizes the
activation site(s) whose ON/OFF entropy in the previous round's last
training epoch was lowest (DESIGN.md §5) and retrains the full schedule with
a fresh optimizer. Linearizing changes a mask, i.e. state: every round runs
the one compiled train step.

    method:
      name: easier
      max_rounds: null     # linearization rounds after round 0; null: until a stop below
      acc_budget: 1.0      # largest allowed drop of validation accuracy vs round 0 (points)
      merge_cost: latency  # how jaxprune.merge decides which linear runs to fuse
      latency: true        # time dense, unfused and fused models; export the faster
      latency_rounds: 3    # rounds of that timing (each model and runtime a fresh process)
      pretrain_epochs: 0   # dense training before round 0 (checkpointed as stage "dense")

With `pretrain_epochs`, the dense network is first trained that long (a
schedule of its own); every round, round 0 included, then trains
`train.epochs` from the weights before it, so round 0 is the reference the
rounds are compared with at equal training. (The reference trains from scratch
in round 0 with the same schedule as the others: `pretrain_epochs: 0`.)

Stops after `max_rounds`, after the first round whose validation accuracy
drops more than `acc_budget` points below round 0, or when every site is
linear. The selected model is the round with the most sites linearized inside
the budget; it is fused (`jaxprune.merge`), exported to PyTorch and reported.
Every epoch and every round is checkpointed; running the same config again
continues from the last checkpoint. A round whose loss turns NaN or infinite
ends the search: the rounds before it are selected from as usual, and the
results record where it diverged.

The package: `entropy.py` (the ON/OFF entropy), `selection.py` (the rule that
picks sites, stops and selects a round), `method.py` (the rounds), `report.py`.
"""
from __future__ import annotations

import dataclasses

from jaxprune.config import FuseConfig, option
from jaxprune.merging import COST_MODELS
from jaxprune.methods import register


@register("easier", run="jaxprune.methods.easier.method")
@dataclasses.dataclass(frozen=True)
class EasierConfig(FuseConfig):
    name: str = "easier"
    # linearization rounds after the dense round 0; None: no limit
    max_rounds: int | None = option(None, ge=0, why="rounds after round 0; null: no limit")
    # points of validation accuracy that may be lost vs round 0
    acc_budget: float = option(1.0, ge=0, why="a drop in points of validation accuracy")
    # dense training before round 0 (a model without pretrained weights), so that the
    # rounds, round 0 included, each finetune a trained network for train.epochs
    pretrain_epochs: int = option(0, ge=0)
    # fuse a run only where its fused layer measures faster on this machine
    merge_cost: str = option("latency", choices=COST_MODELS)
    # rounds of timing the dense, unfused and fused models (fresh processes each)
    latency_rounds: int = option(3, ge=1)
