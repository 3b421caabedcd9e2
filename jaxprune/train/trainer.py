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
counts, and per site the sum of the per-batch values of the hooks' site
metric, e.g. EASIER's entropy) and are fetched once at the end of it.

Methods pass `hooks=` (a `Hooks`) for what they add to the steps: a per-site
statistic of the sites' ON fractions (EASIER's entropy), extra trained arrays
(gate scores, SNL's alphas), masks computed from them inside the traced step,
extra loss terms (distillation from a frozen teacher, cost regularizers) and
read-only values that change between steps without a retrace (`set_aux`).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxprune.activation_sites import pop_on_fractions, recording_graphdef
from jaxprune.config import TrainConfig
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


class Hooks:
    """What a method adds to the compiled steps; the defaults add nothing.

    The traced methods receive `extra` (arrays trained with the model's
    parameters), `aux` (arrays the steps read but never train: a teacher's
    state, a coefficient, a random key; `Trainer.set_aux` replaces them between
    steps, a new value of the same shape reuses the compiled step) and `step`
    (int32, optimizer steps taken since the trainer was built).
    Whatever `prepare` writes into the model's state (e.g. masks) is kept in the
    trainer's state, so it must keep each variable's shape.
    """
    metrics: tuple[str, ...] = ()  # names of the scalars `loss` reports; per-epoch means in "terms"
    # Name of a per-site scalar computed in every train step from the sites' ON fractions
    # (`site_value`), averaged over the epoch's batches; None records no site statistics.
    site_metric: str | None = None

    def site_value(self, on_frac):
        """One site's per-batch value from its per-channel ON fractions (C,)."""
        raise NotImplementedError

    def extra_params(self):
        """Pytree of arrays trained alongside the model's parameters, e.g. gate scores."""
        return {}

    def extra_decay(self, extra):
        """Which `extra` arrays weight decay applies to (pytree of bools like `extra`)."""
        return jax.tree.map(lambda _: False, extra)

    def aux(self):
        """Pytree of the read-only arrays the steps start with."""
        return {}

    def prepare(self, m: Net, extra, aux, step, *, train: bool) -> None:
        """Edit the merged model before its forward pass (train and eval steps)."""

    def loss(self, m: Net, logits, batch, loss, extra, aux, step):
        """The objective from the batch-mean cross-entropy `loss`:
        `(objective, {name: scalar for name in metrics})`."""
        return loss, {}


class Trainer:
    """Compiled train/eval steps and the device copy of one model's state."""

    def __init__(self, m: Net, cfg: TrainConfig, *, steps_per_epoch: int, mesh=None,
                 hooks: Hooks | None = None):
        self.model = m
        self.mesh = mesh if mesh is not None else make_mesh()
        self.hooks = hooks if hooks is not None else Hooks()
        record = self.hooks.site_metric is not None
        self.sites = m.sites() if record else []
        decay_1d = cfg.weight_decay_1d

        def decay_mask(tree):  # the optimizer sees (model parameters, hooks' extra)
            params, extra = tree
            return (jax.tree.map(lambda p: decay_1d or p.ndim >= 2, params),
                    self.hooks.extra_decay(extra))
        self.steps_per_epoch = steps_per_epoch  # `fit` trains this many batches an epoch
        self.tx, self.schedule = make_optimizer(cfg, steps_per_epoch, decay_mask)
        self.traces = {"train": 0, "eval": 0}
        self._smoothing = cfg.label_smoothing
        self._num_classes = m.spec.num_classes
        repl = replicated(self.mesh)
        self._train = jax.jit(self._train_fn(recording_graphdef(m, train=True, record=record)),
                              donate_argnums=(0, 1, 2, 3, 4, 5), out_shardings=repl)
        self._eval = jax.jit(self._eval_fn(recording_graphdef(m, train=False, record=False)),
                             donate_argnums=(3,), out_shardings=repl)
        # float32 zeros, not Python floats: a weak-typed start would retrace the second step.
        zero = np.zeros((), np.float32)
        self._zero_train = {"loss": zero, "correct": zero, "n": zero, "batches": zero,
                            "bad": zero,
                            "sites": np.zeros((len(self.sites),), np.float32),
                            "terms": {k: zero for k in self.hooks.metrics}}
        self._zero_eval = {"loss": zero, "correct": zero, "n": zero}
        self.params = self.rest = self.opt_state = self._acc = None
        self.extra = self.aux = None
        self.step = replicate(np.zeros((), np.int32), self.mesh)

    # -- the traced functions -------------------------------------------------------------

    def _loss(self, logits, labels):
        targets = _targets(labels, self._num_classes, self._smoothing)
        return optax.softmax_cross_entropy(logits, targets)

    def _train_fn(self, graphdef):
        hooks = self.hooks

        def step(params, extra, rest, opt_state, acc, count, aux, batch):
            self.traces["train"] += 1  # runs only while tracing

            def loss_fn(trained):
                p, ex = trained
                m = nnx.merge(graphdef, p, rest, copy=True)
                hooks.prepare(m, ex, aux, count, train=True)
                logits = m(batch["image"])
                on = pop_on_fractions(m, self.sites)
                site_values = (jnp.stack([hooks.site_value(p) for p in on]) if on
                               else jnp.zeros((0,), jnp.float32))
                new_rest = nnx.state(m, nnx.Not(nnx.Param))  # batch stats, rng counts, masks
                ce = jnp.mean(self._loss(logits, batch["label"]))
                total, terms = hooks.loss(m, logits, batch, ce, ex, aux, count)
                return total, (logits, site_values, new_rest, terms)

            (loss, (logits, site_values, rest, terms)), grads = jax.value_and_grad(
                loss_fn, has_aux=True)((params, extra))
            updates, opt_state = self.tx.update(grads, opt_state, (params, extra))
            params, extra = optax.apply_updates((params, extra), updates)
            n = logits.shape[0]
            batch_no = acc["batches"] + 1
            # the epoch's first batch (1-based) whose loss was not finite; 0 while all were
            bad = jnp.where((acc["bad"] == 0) & ~jnp.isfinite(loss), batch_no, acc["bad"])
            acc = {"loss": acc["loss"] + loss * n, "bad": bad,
                   "correct": acc["correct"] + jnp.sum(_hits(logits, batch["label"])),
                   "n": acc["n"] + n, "batches": batch_no,
                   "sites": acc["sites"] + site_values,
                   "terms": {k: acc["terms"][k] + terms[k] for k in hooks.metrics}}
            return params, extra, rest, opt_state, acc, count + 1
        return step

    def _eval_fn(self, graphdef):
        def step(params, extra, rest, acc, aux, count, batch):
            self.traces["eval"] += 1
            m = nnx.merge(graphdef, params, rest, copy=True)
            self.hooks.prepare(m, extra, aux, count, train=False)
            logits = m(batch["image"])
            labels = batch["label"]
            weight = batch["mask"]  # 0 for the rows that pad the last batch to full size
            return {"loss": acc["loss"] + jnp.sum(self._loss(logits, labels) * weight),
                    "correct": acc["correct"] + jnp.sum(_hits(logits, labels) * weight),
                    "n": acc["n"] + jnp.sum(weight)}
        return step

    # -- state ------------------------------------------------------------------------------

    def start_round(self) -> None:
        """Copy the model's current state (weights, statistics, masks) and the hooks'
        extra parameters and aux values to the devices, and start a fresh optimizer:
        momentum zero, schedule back at step 0."""
        params, rest = nnx.state(self.model, nnx.Param, ...)
        # A copy, never an alias: the train step donates its inputs, and the model (or a
        # clone of it, e.g. a teacher) may hold these very arrays after a sync_model.
        # (device_put may hand back the caller's buffer as one shard, so copy explicitly.)
        self.params, self.rest, self.extra = jax.tree.map(
            jnp.copy, replicate((params, rest, self.hooks.extra_params()), self.mesh))
        self.aux = replicate(self.hooks.aux(), self.mesh)
        self.opt_state = replicate(self.tx.init((self.params, self.extra)), self.mesh)
        self._acc = None

    def set_aux(self, **values) -> None:
        """Replace entries of the hooks' aux values (same shapes: no retrace)."""
        unknown = set(values) - set(self.aux)
        if unknown:
            raise KeyError(f"no aux entries {sorted(unknown)}; the hooks define {sorted(self.aux)}")
        self.aux = {**self.aux, **replicate(values, self.mesh)}

    def state(self) -> dict:
        """Everything the steps read and update: what a train checkpoint holds."""
        return {"params": self.params, "rest": self.rest, "extra": self.extra,
                "opt_state": self.opt_state, "step": self.step, "aux": self.aux}

    def set_state(self, state: dict) -> None:
        """Continue from `state()` of an earlier trainer of the same model and hooks."""
        (self.params, self.rest, self.extra, self.opt_state, self.step, self.aux) = (
            state["params"], state["rest"], state["extra"], state["opt_state"], state["step"],
            state["aux"])
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
        (self.params, self.extra, self.rest, self.opt_state, self._acc, self.step) = self._train(
            self.params, self.extra, self.rest, self.opt_state, self._acc, self.step, self.aux,
            batch)

    def finish_epoch(self) -> dict:
        """Fetch the epoch's training metrics and reset the accumulator.

        `sites` maps each site to the mean of its per-batch values of the hooks' site
        metric (empty without one), `terms` each of the hooks' metrics to its mean over
        the epoch's batches; `nonfinite_batch`
        the first batch (1-based) whose loss was NaN or infinite, 0 if none was."""
        if self._acc is None:
            raise RuntimeError("finish_epoch() before any train_step()")
        acc, self._acc = fetch(self._acc), None
        seconds = time.perf_counter() - self._t0
        n, batches = max(float(acc["n"]), 1.0), max(float(acc["batches"]), 1.0)
        return {"loss": float(acc["loss"]) / n, "acc": 100.0 * float(acc["correct"]) / n,
                "examples": int(acc["n"]), "nonfinite_batch": int(acc["bad"]),
                "seconds": seconds, "img_s": float(acc["n"]) / seconds,
                "sites": dict(zip(self.sites, (acc["sites"] / batches).tolist())),
                "terms": {k: float(v) / batches for k, v in acc["terms"].items()}}

    def evaluate(self, batches) -> dict:
        """Eval-mode loss and accuracy (percent) over global batches, weighted by `mask`."""
        acc = replicate(self._zero_eval, self.mesh)
        for batch in batches:
            acc = self._eval(self.params, self.extra, self.rest, acc, self.aux, self.step, batch)
        acc = fetch(acc)
        n = max(float(acc["n"]), 1.0)
        return {"loss": float(acc["loss"]) / n, "acc": 100.0 * float(acc["correct"]) / n,
                "examples": int(acc["n"])}
