"""What the two-stage methods (DepthShrinker, SNL) share.

* the *original* network: the config's model, from `model.pretrained` when
  given, then trained densely for `pretrain_epochs` when asked (the small
  configs have no pretrained weights); checkpointed, so a rerun resumes;
* self-distillation from it (`Distillation`), frozen and in eval mode,
  computed inside the compiled step;
* stage checkpoints, evaluation, fusing and export, and writing the report.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxprune import distributed
from jaxprune.config import Config
from jaxprune.errors import UserError
from jaxprune.train import Data, Journal, Trainer, fit, make_mesh
from jaxprune.train.checkpoint import Checkpoints
from jaxprune.train.trainer import Hooks
from models.net import Net


def image_size(cfg: Config, data: Data) -> tuple[int, int]:
    """The (H, W) the loaders produce: `data.image_size`, else the data set's own."""
    s = cfg.data.image_size
    return tuple(data.info.image_size) if s is None else (s, s)


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


def stage_checkpoints(run_dir: Path, stage: str) -> Checkpoints:
    """One folder per stage (`checkpoints/<stage>/round_000`)."""
    return Checkpoints(Path(run_dir) / "checkpoints" / stage)


def evaluate(m: Net, cfg: Config, data: Data, mesh, splits=("val", "test")) -> dict:
    """Eval-mode accuracy (percent) of `m` on each split: {"val_acc", "test_acc", ...}."""
    trainer = Trainer(m, cfg.train, steps_per_epoch=1, mesh=mesh, stats=False)
    trainer.start_round()
    out = {}
    for split in splits:
        r = trainer.evaluate(data.eval_batches(split))
        out[f"{split}_acc"], out[f"{split}_loss"] = r["acc"], r["loss"]
    return out


def original_model(cfg: Config, data: Data, mesh, run_dir: Path, journal: Journal,
                   pretrain_epochs: int) -> Net:
    """The network the method starts from (see the module doc); checkpointed as stage
    `dense` when it was trained here."""
    from jaxprune.runner import build_model
    if pretrain_epochs < 0:
        raise UserError(f"method.pretrain_epochs must be >= 0, got {pretrain_epochs}")
    m = build_model(cfg, data.info.num_classes)
    if not pretrain_epochs:
        return m
    ckpt = stage_checkpoints(run_dir, "dense")
    if ckpt.latest() is not None:
        ckpt.load(0, m)
        return m
    # the schedule spans the stage it trains
    train = dataclasses.replace(cfg.train, epochs=pretrain_epochs)
    trainer = Trainer(m, train, steps_per_epoch=data.steps_per_epoch(), mesh=mesh, stats=False)
    trainer.start_round()
    fit(trainer, data, pretrain_epochs, journal=journal, tag={"stage": "dense"})
    ckpt.save(0, m, {"stage": "dense", "epochs": pretrain_epochs})
    return m


@dataclasses.dataclass(frozen=True)
class Start:
    """What a staged method has before its first stage."""
    mesh: object
    data: Data
    hw: tuple[int, int]
    journal: Journal
    original: Net


def start(cfg: Config, run_dir: Path, pretrain_epochs: int) -> Start:
    """The device mesh, the data, the input size, the journal (metrics and epoch checkpoints) and the original
    network (trained first when `pretrain_epochs` asks for it)."""
    mesh = make_mesh()
    data = Data(cfg, mesh)
    journal = Journal(run_dir)
    original = original_model(cfg, data, mesh, Path(run_dir), journal, pretrain_epochs)
    return Start(mesh, data, image_size(cfg, data), journal, original)


LATENCY_RUNTIMES, LATENCY_REPEATS = ("jax", "torch"), 30


def fuse_and_export(m: Net, dense: Net, run_dir: Path, hw, *, cost: str = "macs",
                    export: bool = True) -> dict:
    """Fuse `m` with `jaxprune.merge` at input size `hw`, profile the dense original and
    the fused model (depth, params, MACs, JAX latency on this device), export the fused
    model to PyTorch where this installation can, checking each step against `m`.
    Returns ({"merge": ..., "export": ...} for results.json, the fused model)."""
    from jaxprune import merge, profile
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, *hw, m.spec.in_channels)))
    m.eval()
    reference = np.asarray(m(x))
    small, rep = merge(m, input_size=hw, cost=cost, return_report=True)
    # latency of one image, JAX (jit) and the exported torch module (eager), on this device
    before = profile(dense, hw, latency=LATENCY_RUNTIMES, batch=1, repeats=LATENCY_REPEATS)
    after = profile(small, hw, latency=LATENCY_RUNTIMES, batch=1, repeats=LATENCY_REPEATS)
    out = {"merge": {**rep.as_dict(),
                     "depth_before": before.depth, "params_before": before.params,
                     "macs_before": before.macs,
                     "latency_ms_before": before.latency_ms, "latency_ms_after": after.latency_ms,
                     "latency_device": jax.devices()[0].device_kind,
                     "max_abs_diff": float(np.max(np.abs(np.asarray(small(x)) - reference)))}}
    if export and distributed.is_main():  # one process writes the run folder
        out["export"] = export_torch(small, run_dir, x, reference)
    return out, small


def export_torch(small: Net, run_dir: Path, x: np.ndarray, reference: np.ndarray) -> dict:
    """`converters.export` of `small` into run_dir/export, checked with torch on `x`."""
    import converters
    exporter = getattr(converters, "export", None)
    if exporter is None:
        return {"status": "not exported: this installation has no converters.export"}
    import torch
    path = exporter(small, Path(run_dir) / "export")
    module = converters.to_torch(small)
    with torch.no_grad():
        got = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    return {"path": str(path), "max_abs_diff": float(np.max(np.abs(got - reference)))}
