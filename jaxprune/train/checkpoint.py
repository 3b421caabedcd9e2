"""Checkpoints on orbax: a model's state after each round or stage, and the whole training
state after each epoch.

    ckpt = Checkpoints(run_dir / "checkpoints" / "rounds")
    ckpt.save(3, m, {"rounds": [...]})    # rounds/round_003/
    ckpt.latest()                         # 3, or None
    meta = ckpt.load(3, m)                # weights, statistics and masks back into m

    epochs = TrainCheckpoints(run_dir / "checkpoints" / "train")
    epochs.save(trainer, {"tag": {...}, "epoch": 2, ...})   # train/epoch_000007/
    meta = epochs.restore(trainer)        # the latest epoch's state into the trainer, or None

Orbax writes a checkpoint into a temporary folder and renames it into place once it is
complete, so a crash (or a full disk) never leaves a half-written checkpoint that looks
finished: the previous one stays the latest. Model checkpoints hold parameters, BatchNorm
statistics and site masks keyed by their NNX path (`layers.layer1.0.conv1.kernel`);
train checkpoints add the optimizer state, the step count, the methods' extra trained
arrays and aux values — everything a step reads — so training resumes exactly. Every
process calls save (orbax coordinates them; the primary process writes replicated
arrays) and every process can read.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxprune import distributed
from jaxprune.errors import UserError
from models.layers import Mask
from models.net import Net

SAVED = (nnx.Param, nnx.BatchStat, Mask)  # what a model checkpoint holds
_TMP = "*.orbax-checkpoint-tmp*"


def _key(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _keyed(tree):
    """({dotted path: leaf}, treedef) of a pytree (NNX states, optax states, dicts)."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {_key(path): leaf for path, leaf in pairs}, treedef


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs a failing write's traceback from its writer thread before raising it here;
    the caller turns the exception into one clear error, so that log is only noise."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Store:
    """Numbered orbax checkpoints in one folder: a pytree of arrays, stored flat under dotted
    names, plus a JSON record."""

    def __init__(self, folder: str | Path, prefix: str, digits: int, keep: int | None):
        self.folder, self.prefix, self.digits = Path(folder), prefix, digits
        self._keep = keep
        self._manager = None

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:  # created on first use: merely naming a store writes nothing
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self._keep, step_prefix=self.prefix,
                step_format_fixed_length=self.digits, enable_async_checkpointing=False,
                create=True)
            self._manager = ocp.CheckpointManager(self.folder.absolute(), options=options)
        return self._manager

    def path(self, step: int) -> Path:
        return self.folder / f"{self.prefix}_{step:0{self.digits}d}"

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        if not self.folder.is_dir():
            return []
        self.manager.reload()  # another process (or an earlier run) may have written some
        # orbax finalizes a checkpoint by renaming it into place with its metadata file; a
        # folder without that file was made by hand or damaged, and is not a checkpoint
        return sorted(s for s in self.manager.all_steps()
                      if (self.path(s) / "_CHECKPOINT_METADATA").is_file())

    def latest(self) -> int | None:
        done = self.steps()
        return done[-1] if done else None

    def save(self, step: int, tree, meta: dict) -> Path:
        tree, _ = _keyed(tree)
        meta = {**meta, "shapes": {k: list(np.shape(v)) for k, v in tree.items()}}
        where = self.path(step)
        if distributed.is_main() and self.folder.is_dir():
            # What a crash or a full disk left behind (never counted as a checkpoint). Only the
            # writer cleans, and only before it writes: a reader could catch a write mid-way.
            for tmp in self.folder.glob(_TMP):
                shutil.rmtree(tmp, ignore_errors=True)
        try:
            with _quiet_orbax():
                self.manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)
                self.manager.wait_until_finished()
        except (OSError, ValueError) as e:  # tensorstore reports I/O errors as ValueError
            before = [s for s in self.steps() if s != step]
            kept = (f"the previous checkpoint {self.path(before[-1])} is intact" if before
                    else "no earlier checkpoint exists")
            reason = " ".join(str(e).split())[-300:]
            raise UserError(f"could not write checkpoint {where} ({reason}); {kept}. Free disk "
                            f"space (or fix the folder's permissions) and run the same command "
                            f"again to resume") from None
        return where

    def restore(self, step: int, like) -> tuple[object, dict]:
        """The arrays of `step` as a pytree like `like` (same structure, shapes, dtypes and
        shardings), and its record."""
        like, treedef = _keyed(like)
        where = self.path(step)
        meta = self.meta(step)
        saved = meta.get("shapes", {})
        own = {k: list(np.shape(v)) for k, v in like.items()}
        if set(saved) != set(own):
            missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
            raise UserError(f"{where} does not fit this model (missing {missing[:3]}, unexpected "
                            f"{extra[:3]}); it belongs to another model or method: use another "
                            f"run name, or delete {where}")
        for k, shape in own.items():
            if saved[k] != shape:
                raise UserError(f"{where}: '{k}' has shape {tuple(saved[k])}, this run expects "
                                f"{tuple(shape)}; it belongs to another model: use another run "
                                f"name, or delete {where}")
        abstract = {k: ocp.utils.to_shape_dtype_struct(np.asarray(v) if np.isscalar(v) else v)
                    for k, v in like.items()}
        try:
            with _quiet_orbax():
                got = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # noqa: BLE001 - orbax reports a bad chunk as a bare Exception
            e = e.__cause__ or e  # its cause names the file and the byte range
            raise self._damaged(where, e) from None
        return jax.tree.unflatten(treedef, [got["state"][k] for k in like]), meta

    def meta(self, step: int) -> dict:
        where = self.path(step)
        if step not in self.steps():
            raise UserError(f"no checkpoint {where}")
        try:
            with _quiet_orbax():
                return dict(self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"])
        except (OSError, ValueError) as e:
            raise self._damaged(where, e) from None

    @staticmethod
    def _damaged(where: Path, e: Exception) -> UserError:
        reason = " ".join(str(e).split())[-300:]
        return UserError(f"checkpoint {where} is damaged or truncated ({reason}); delete that "
                         f"folder and run the same command again to resume from the checkpoint "
                         f"before it")


def _host_state(m: Net):
    """What a model checkpoint holds, as host arrays (identical on every process)."""
    return jax.tree.map(np.asarray, nnx.state(m, SAVED))


class Checkpoints:
    """A model's state (parameters, BatchNorm statistics, site masks) per round or stage."""

    def __init__(self, folder: str | Path):
        self._store = _Store(folder, "round", 3, keep=None)
        self.folder = self._store.folder

    def path(self, round_: int) -> Path:
        return self._store.path(round_)

    def rounds(self) -> list[int]:
        """Rounds with a complete checkpoint, ascending."""
        return self._store.steps()

    def latest(self) -> int | None:
        return self._store.latest()

    def save(self, round_: int, m: Net, meta: dict) -> Path:
        return self._store.save(round_, _host_state(m), meta)

    def load(self, round_: int, m: Net) -> dict:
        """Load round `round_` into `m` (in place); returns its meta record."""
        state, meta = self._store.restore(round_, _host_state(m))
        nnx.update(m, jax.tree.map(jax.numpy.asarray, state))
        return meta


class TrainCheckpoints:
    """The trainer's whole state after each epoch; the last `keep` epochs are kept."""

    def __init__(self, folder: str | Path, keep: int = 2):
        self._store = _Store(folder, "epoch", 6, keep=keep)
        self.folder = self._store.folder

    def latest_path(self) -> Path | None:
        step = self._store.latest()
        return None if step is None else self._store.path(step)

    def latest_meta(self) -> dict | None:
        step = self._store.latest()
        return None if step is None else self._store.meta(step)

    def save(self, trainer, meta: dict) -> Path:
        step = (self._store.latest() or 0) + 1
        return self._store.save(step, trainer.state(), meta)

    def restore(self, trainer) -> dict:
        """The latest epoch's state into `trainer`; returns its record."""
        step = self._store.latest()
        if step is None:
            raise UserError(f"no train checkpoint in {self.folder}")
        state, meta = self._store.restore(step, trainer.state())
        trainer.set_state(state)
        return meta
