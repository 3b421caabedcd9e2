"""Optimizers and learning-rate schedules of DESIGN.md §5, torch semantics.

* SGD: torch's coupled weight decay (`g + wd * p`, on every parameter) then
  heavy-ball or Nesterov momentum (`buf = m * buf + g`), which is what
  `add_decayed_weights` followed by `optax.sgd` computes.
* Adam: torch's Adam (eps 1e-8); a non-zero `weight_decay` is coupled as in torch.
* Schedules are per step: `step` multiplies the rate by `gamma` at the first
  step of every milestone epoch (torch's MultiStepLR stepped per epoch),
  `cosine` decays to `min_lr` over the run (timm's per-step cosine), `constant`
  keeps it.
* Weight decay applies where `decay_mask` says (optax's mask: a pytree of bools
  or a function of the parameters); the trainer uses it to spare biases and
  other 1-D parameters when `weight_decay_1d` is false.

The options' ranges are checked when the config is read (`jaxprune.config`).
The schedule reads the step count kept in the optimizer state, so a fresh
`tx.init(params)` restarts both momentum and schedule without building (and
compiling) a new step function.
"""
from __future__ import annotations

import optax

from jaxprune.config import TrainConfig


def make_schedule(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    if cfg.schedule == "step":
        milestones = sorted(cfg.milestones)
        scales: dict[int, float] = {}
        for m in milestones:  # repeated milestones decay twice, as in torch's MultiStepLR
            scales[m * steps_per_epoch] = scales.get(m * steps_per_epoch, 1.0) * cfg.gamma
        return optax.piecewise_constant_schedule(cfg.lr, scales)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.lr, max(cfg.epochs * steps_per_epoch, 1),
                                           alpha=cfg.min_lr / cfg.lr)
    return optax.constant_schedule(cfg.lr)


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int, decay_mask=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(tx, schedule)` for `train:` options; `schedule(step)` is the learning rate.
    `decay_mask` (optional): which parameters weight decay applies to (default all)."""
    schedule = make_schedule(cfg, steps_per_epoch)
    parts = []
    if cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    if cfg.optimizer == "sgd":
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    else:
        parts.append(optax.adam(schedule, eps=1e-8))
    return optax.chain(*parts), schedule
