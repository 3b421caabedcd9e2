"""The jitted train and eval steps around one model, data parallel over a mesh.

    trainer = Trainer(m, cfg.train, steps_per_epoch=len(loader))
    trainer.start_round()                 # state to devices, fresh optimizer
    for batch in global_batches:          # dicts of arrays sharded P('data')
        trainer.train_step(batch)
    metrics = trainer.finish_epoch()      # the one host sync of the epoch
    trainer.sync_model()                  # write the trained state back into m

Functional core: `m` is split once into a train-mode and an eval-mode graph
definition (static) and its state (arrays: parameters, batch statistics,
site masks). The steps take the state as arguments and `nnx.merge` inside, so
anything that only changes values, such as linearizing a site (its mask) or
restarting the optimizer, reuses the compiled step. `traces` counts how often
each step was traced, for the tests that hold this.

Metrics accumulate on device across an epoch's steps (loss and correct
counts, and per site the sum of per-batch entropies) and are fetched once at
the end of it.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxprune.config import TrainConfig
from jaxprune.entropy import pop_entropies, recording_graphdef
from jaxprune.train.mesh import fetch, make_mesh, replicate, replicated
from jaxprune.train.optim import make_optimizer
from models.net import Net


def _targets(labels, num_classes: int, smoothing: float):
    """One-hot (or given soft) targets, with optional label smoothing."""
    onehot = labels if labels.ndim == 2 else jax.nn.one_hot(labels, num_classes)
    return optax.smooth_labels(onehot, smoothing) if smoothing else onehot


def _hits(logits, labels):
    truth = jnp.argmax(labels, -1) if labels.ndim == 2 else labels
    return (jnp.argmax(logits, -1) == truth).astype(jnp.float32)


class Trainer:
    """Compiled train/eval steps and the device copy of one model's state."""

    def __init__(self, m: Net, cfg: TrainConfig, *, steps_per_epoch: int, mesh=None,
                 stats: bool = True):
        self.model = m
        self.mesh = mesh if mesh is not None else make_mesh()
        self.sites = m.sites() if stats else []
        self.tx, self.schedule = make_optimizer(cfg, steps_per_epoch)
        self.traces = {"train": 0, "eval": 0}
        self._smoothing = cfg.label_smoothing
        self._num_classes = m.spec.num_classes
        repl = replicated(self.mesh)
        self._train = jax.jit(self._train_fn(recording_graphdef(m, train=True, record=stats)),
                              donate_argnums=(0, 1, 2, 3), out_shardings=repl)
        self._eval = jax.jit(self._eval_fn(recording_graphdef(m, train=False, record=False)),
                             donate_argnums=(2,), out_shardings=repl)
        # float32 zeros, not Python floats: a weak-typed start would retrace the second step.
        zero = np.zeros((), np.float32)
        self._zero_train = {"loss": zero, "correct": zero, "n": zero, "batches": zero,
                            "entropy": np.zeros((len(self.sites),), np.float32)}
        self._zero_eval = {"loss": zero, "correct": zero, "n": zero}
        self.params = self.rest = self.opt_state = self._acc = None

    # -- the traced functions -------------------------------------------------------------

    def _loss(self, logits, labels):
        targets = _targets(labels, self._num_classes, self._smoothing)
        return optax.softmax_cross_entropy(logits, targets)

    def _train_fn(self, graphdef):
        def step(params, rest, opt_state, acc, batch):
            self.traces["train"] += 1  # runs only while tracing

            def loss_fn(p):
                m = nnx.merge(graphdef, p, rest, copy=True)
                logits = m(batch["image"])
                entropy = pop_entropies(m, self.sites)
                new_rest = nnx.state(m, nnx.Not(nnx.Param))  # batch stats, rng counts
                return jnp.mean(self._loss(logits, batch["label"])), (logits, entropy, new_rest)

            (loss, (logits, entropy, rest)), grads = jax.value_and_grad(
                loss_fn, has_aux=True)(params)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            n = logits.shape[0]
            acc = {"loss": acc["loss"] + loss * n,
                   "correct": acc["correct"] + jnp.sum(_hits(logits, batch["label"])),
                   "n": acc["n"] + n, "batches": acc["batches"] + 1,
                   "entropy": acc["entropy"] + entropy}
            return params, rest, opt_state, acc
        return step

    def _eval_fn(self, graphdef):
        def step(params, rest, acc, batch):
            self.traces["eval"] += 1
            logits = nnx.merge(graphdef, params, rest)(batch["image"])
            labels = batch["label"]
            weight = batch["mask"]  # 0 for the rows that pad the last batch to full size
            return {"loss": acc["loss"] + jnp.sum(self._loss(logits, labels) * weight),
                    "correct": acc["correct"] + jnp.sum(_hits(logits, labels) * weight),
                    "n": acc["n"] + jnp.sum(weight)}
        return step

    # -- state ------------------------------------------------------------------------------

    def start_round(self) -> None:
        """Copy the model's current state (weights, statistics, masks) to the devices
        and start a fresh optimizer: momentum zero, schedule back at step 0."""
        params, rest = nnx.state(self.model, nnx.Param, ...)
        self.params, self.rest = replicate((params, rest), self.mesh)
        self.opt_state = replicate(self.tx.init(self.params), self.mesh)
        self._acc = None

    def sync_model(self) -> Net:
        """Write the device state back into the model (after training, before using it)."""
        nnx.update(self.model, self.params, self.rest)
        return self.model

    # -- epochs -----------------------------------------------------------------------------

    def train_step(self, batch) -> None:
        """One optimizer step on a global batch; no host sync."""
        if self._acc is None:
            self._acc = replicate(self._zero_train, self.mesh)
            self._t0 = time.perf_counter()
        self.params, self.rest, self.opt_state, self._acc = self._train(
            self.params, self.rest, self.opt_state, self._acc, batch)

    def finish_epoch(self) -> dict:
        """Fetch the epoch's training metrics and reset the accumulator.

        `entropy` maps each site to the mean of its per-batch entropies."""
        if self._acc is None:
            raise RuntimeError("finish_epoch() before any train_step()")
        acc, self._acc = fetch(self._acc), None
        seconds = time.perf_counter() - self._t0
        n, batches = max(float(acc["n"]), 1.0), max(float(acc["batches"]), 1.0)
        return {"loss": float(acc["loss"]) / n, "acc": 100.0 * float(acc["correct"]) / n,
                "examples": int(acc["n"]), "seconds": seconds, "img_s": float(acc["n"]) / seconds,
                "entropy": dict(zip(self.sites, (acc["entropy"] / batches).tolist()))}

    def evaluate(self, batches) -> dict:
        """Eval-mode loss and accuracy (percent) over global batches, weighted by `mask`."""
        acc = replicate(self._zero_eval, self.mesh)
        for batch in batches:
            acc = self._eval(self.params, self.rest, acc, batch)
        acc = fetch(acc)
        n = max(float(acc["n"]), 1.0)
        return {"loss": float(acc["loss"]) / n, "acc": 100.0 * float(acc["correct"]) / n,
                "examples": int(acc["n"])}
