"""Self-distillation from a frozen teacher inside the compiled step (DepthShrinker, SNL)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxprune.errors import UserError
from jaxprune.train.trainer import Hooks
from models.net import Net


def kd_loss(student_logits, teacher_logits, temperature: float):
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), mean over the batch.

    The released DepthShrinker code uses the soft cross-entropy instead; the two
    differ by the teacher's entropy, a constant, so they train identically."""
    t = jax.nn.log_softmax(teacher_logits / temperature)
    s = jax.nn.log_softmax(student_logits / temperature)
    return temperature ** 2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


class Distillation:
    """`kd_weight · kd_loss(student, teacher, T) + ce_weight · CE` with a frozen teacher.

    The teacher (a copy, eval mode) runs inside the compiled step on the same
    batch; its state travels as an aux value. The CE here is on the labels as
    given, without label smoothing (as the released distillation loss)."""

    def __init__(self, teacher: Net, *, temperature: float, kd_weight: float, ce_weight: float):
        if temperature <= 0:
            raise UserError(f"the distillation temperature must be positive, got {temperature}")
        t = nnx.clone(teacher)
        t.eval()
        self.graphdef, self.state = nnx.split(t)
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight

    def aux(self) -> dict:
        return {"teacher": self.state}

    def __call__(self, logits, batch, aux):
        """(loss, kd term) for one batch."""
        teacher = jax.lax.stop_gradient(nnx.merge(self.graphdef, aux["teacher"])(batch["image"]))
        kd = kd_loss(logits, teacher, self.temperature)
        labels = batch["label"]
        targets = labels if labels.ndim == 2 else jax.nn.one_hot(labels, logits.shape[-1])
        ce = jnp.mean(optax.softmax_cross_entropy(logits, targets))
        return self.kd_weight * kd + self.ce_weight * ce, kd


class DistillHooks(Hooks):
    """Training with distillation only (e.g. SNL's finetune): no extra parameters."""
    metrics = ("kd",)

    def __init__(self, distill: Distillation):
        self.distill = distill

    def aux(self):
        return self.distill.aux()

    def loss(self, m, logits, batch, loss, extra, aux, step):
        total, kd = self.distill(logits, batch, aux)
        return total, {"kd": kd}
