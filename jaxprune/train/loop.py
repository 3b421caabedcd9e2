"""Epoch loops over the data sets of `jaxprune.data`, with progress bars and a
per-epoch metrics log (`runs/<name>/metrics.jsonl`, one JSON object per line)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import jax
from tqdm import tqdm

from jaxprune.config import Config
from jaxprune.train.trainer import Trainer


class MetricsLog:
    """Appends one JSON line per record; only process 0 writes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        if jax.process_index() == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class Data:
    """The config's data set as per-epoch loaders of global (sharded) batches."""

    def __init__(self, cfg: Config, mesh):
        from jaxprune import data
        self._data, self.cfg, self.mesh = data, cfg, mesh
        d = cfg.data
        self.info = data.describe(d.name, d.root)
        self.batch_size = d.batch_size
        self.eval_batch_size = d.eval_batch_size or d.batch_size

    def _loader(self, split: str, *, epoch: int, train: bool):
        d = self.cfg.data
        return self._data.loader(
            d.name, d.root, split, batch_size=self.batch_size if train else self.eval_batch_size,
            seed=self.cfg.seed, epoch=epoch, train=train, image_size=d.image_size,
            num_workers=d.num_workers, drop_remainder=train,
            mixup=d.mixup if train else 0.0, cutmix=d.cutmix if train else 0.0)

    def steps_per_epoch(self) -> int:
        return len(self._loader("train", epoch=0, train=True))

    def train_batches(self, epoch: int):
        """Loader and global batches of one training epoch (shuffled and augmented
        per `epoch`; the short last batch is dropped so the step keeps one shape)."""
        loader = self._loader("train", epoch=epoch, train=True)
        return loader, (self._data.to_global(b, self.mesh) for b in loader)

    def eval_batches(self, split: str):
        """Global batches of `split`; the last one is padded to full size (`mask` 0)."""
        return (self._data.to_global(b, self.mesh)
                for b in self._loader(split, epoch=0, train=False))


def train_epoch(trainer: Trainer, data: Data, epoch: int, desc: str) -> dict:
    loader, batches = data.train_batches(epoch)
    for batch in tqdm(batches, total=len(loader), desc=desc, leave=False,
                      disable=jax.process_index() != 0):
        trainer.train_step(batch)
    return trainer.finish_epoch()


def fit(trainer: Trainer, data: Data, epochs: int, *, log: MetricsLog | None = None,
        tag: dict | None = None, epoch_offset: int = 0,
        on_epoch: Callable[[int, dict], bool | None] | None = None) -> dict:
    """Train `epochs` epochs from the trainer's current state (call `start_round` first),
    validating after each; returns the last epoch's record. `tag` (e.g. the round)
    goes into every log record; `epoch_offset` varies the shuffling between calls.
    `on_epoch(epoch, record)` runs after each epoch, before the record is logged: it
    may add entries to the record, change the trainer's aux values for the next
    epoch, and return True to stop early."""
    tag = dict(tag or {})
    steps = data.steps_per_epoch()
    record: dict = {}
    bar = tqdm(range(epochs), desc=" ".join(f"{k} {v}" for k, v in tag.items()) or "train",
               disable=jax.process_index() != 0)
    for epoch in bar:
        lr = float(trainer.schedule(epoch * steps))
        train = train_epoch(trainer, data, epoch_offset + epoch, desc=f"epoch {epoch + 1}/{epochs}")
        val = trainer.evaluate(data.eval_batches("val"))
        record = {**tag, "epoch": epoch + 1, "lr": lr,
                  "train_loss": train["loss"], "train_acc": train["acc"],
                  "val_loss": val["loss"], "val_acc": val["acc"],
                  "seconds": train["seconds"], "img_s": train["img_s"],
                  "entropy": train["entropy"], **train["terms"]}
        bar.set_postfix(loss=f"{train['loss']:.3f}", acc=f"{train['acc']:.1f}",
                        val=f"{val['acc']:.1f}")
        stop = on_epoch is not None and on_epoch(epoch, record)
        if log is not None:
            log.write(record)
        if stop:
            break
    trainer.sync_model()
    return record
