"""Epoch loops over the data sets of `jaxprune.data`, with progress bars, a per-epoch
metrics log (`<run>/metrics.jsonl`, one JSON object per line) and a checkpoint of the whole
training state after every epoch, from which a rerun of the same command continues."""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from jaxprune.config import Config
from jaxprune.distributed import is_main
from jaxprune.errors import UserError
from jaxprune.files import write_text_atomic
from jaxprune.train.checkpoint import TrainCheckpoints
from jaxprune.train.trainer import Trainer

METRICS = "metrics.jsonl"


class Diverged(UserError):
    """A training loss became NaN or infinite. That epoch's state is not checkpointed: the
    latest checkpoint is the last good one. `record` says where (for metrics and reports)."""

    def __init__(self, record: dict, kept: Path | None):
        self.record = record
        where = " ".join(f"{k} {v}" for k, v in record["tag"].items())
        kept_text = (f"the last good checkpoint {kept} is kept" if kept is not None
                     else "no checkpoint of this training was written")
        super().__init__(
            f"non-finite training loss in {where + ', ' if where else ''}epoch "
            f"{record['epoch']}/{record['epochs']}, step {record['step']}/{record['steps']} "
            f"(loss {record['loss']}); the training stopped there and {kept_text}. Lower "
            f"train.lr or set train.grad_clip, under another run name")


class Journal:
    """What a run keeps between epochs: `metrics.jsonl` (one JSON object per epoch) and the
    latest epochs' training state (`checkpoints/train/`, see `TrainCheckpoints`).

    Each epoch's record is logged first, then its checkpoint written, which remembers how
    many lines the log had. Opening a journal drops the lines logged after the latest
    checkpoint: those epochs never got one, so a resumed run trains them again and logs
    them once. Only process 0 writes the log."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS
        self.checkpoints = TrainCheckpoints(Path(run_dir) / "checkpoints" / "train")
        latest = self.checkpoints.latest_meta()
        self.lines = latest["log_lines"] if latest else 0
        if is_main() and self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            if len(lines) > self.lines:
                write_text_atomic(self.path, "".join(lines[:self.lines]))

    def write(self, record: dict) -> None:
        if is_main():
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.lines += 1

    def save(self, trainer: Trainer, tag: dict, epochs: int, records: list[dict],
             stopped: bool, data_position: dict) -> Path:
        """Checkpoint the trainer after an epoch. `data_position` is where the data iterator
        continues ({"epoch": the data epoch next, "batch": 0}): an epoch's order is a pure
        function of (seed, data epoch), so that is the iterator's whole state."""
        return self.checkpoints.save(trainer, {"tag": tag, "epochs": epochs, "records": records,
                                               "stopped": stopped, "log_lines": self.lines,
                                               "data": data_position})

    def resume(self, trainer: Trainer, tag: dict, epochs: int,
               epoch_offset: int = 0) -> tuple[list[dict], bool]:
        """(records, stopped) of the training `tag` when the latest checkpoint belongs to it
        (its state is then loaded into `trainer`), else ([], False)."""
        latest = self.checkpoints.latest_meta()
        if not latest or latest["tag"] != tag or latest["epochs"] != epochs:
            return [], False
        expected = {"epoch": epoch_offset + len(latest["records"]), "batch": 0}
        if latest["data"] != expected:
            raise UserError(f"{self.checkpoints.latest_path()} continues the data at "
                            f"{latest['data']}, this training at {expected}: it was written by "
                            f"another version or schedule; use another run name")
        meta = self.checkpoints.restore(trainer)
        if is_main():
            where = " ".join(f"{k} {v}" for k, v in tag.items())
            print(f"resuming {where or 'training'} after epoch {len(meta['records'])}/{epochs} "
                  f"from {self.checkpoints.folder}", flush=True)
        return meta["records"], meta["stopped"]


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
    """One epoch of training: the first `trainer.steps_per_epoch` batches of its shuffled
    order (all of them, for a trainer built with the data's steps)."""
    loader, batches = data.train_batches(epoch)
    steps = min(trainer.steps_per_epoch, len(loader))
    # `with`: an error closes the bar before it is reported, not after
    with tqdm(itertools.islice(batches, steps), total=steps, desc=desc, leave=False,
              disable=not is_main()) as bar:
        for batch in bar:
            trainer.train_step(batch)
    return trainer.finish_epoch()


def fit(trainer: Trainer, data: Data, epochs: int, *, journal: Journal | None = None,
        tag: dict | None = None, epoch_offset: int = 0,
        on_epoch: Callable[[int, dict, list[dict]], bool | None] | None = None) -> list[dict]:
    """Train `epochs` epochs from the trainer's current state (call `start_round` first),
    validating after each; returns every epoch's record. Each epoch trains the first
    `trainer.steps_per_epoch` batches of its shuffled order (all of them when the trainer
    was built with `data.steps_per_epoch()`; fewer: a subset of the training set, its
    schedule spanning them). `tag` (e.g. the round) names this training in the log and its
    checkpoints; `epoch_offset` varies the shuffling between calls.
    `on_epoch(epoch, record, earlier_records)` runs after each epoch, before the record is
    logged: it may add entries to the record, change the trainer's aux values for
    the next epoch, and return True to stop early.

    With a `journal`, each epoch is logged and checkpointed, and a training with the tag of
    the latest checkpoint continues after that checkpoint's epoch: same state, same data
    order, so the same result as without the interruption. A NaN or infinite loss raises
    `Diverged` before that epoch is checkpointed."""
    tag = dict(tag or {})
    steps = min(trainer.steps_per_epoch, data.steps_per_epoch())
    records, stopped = (journal.resume(trainer, tag, epochs, epoch_offset) if journal is not None
                        else ([], False))
    with tqdm(total=epochs, initial=len(records), disable=not is_main(),
              desc=" ".join(f"{k} {v}" for k, v in tag.items()) or "train") as bar:
        for epoch in range(len(records), epochs if not stopped else 0):
            if _epoch(trainer, data, epoch, epochs, steps, records, bar, journal=journal,
                      tag=tag, epoch_offset=epoch_offset, on_epoch=on_epoch):
                break
    trainer.sync_model()
    return records


def _epoch(trainer, data, epoch, epochs, steps, records, bar, *, journal, tag, epoch_offset,
           on_epoch) -> bool:
    """Train, validate, log and checkpoint epoch `epoch` of `fit`; True to stop early."""
    lr = float(trainer.schedule(epoch * steps))
    train = train_epoch(trainer, data, epoch_offset + epoch, desc=f"epoch {epoch + 1}/{epochs}")
    if train["nonfinite_batch"]:
        raise Diverged({"tag": tag, "epoch": epoch + 1, "epochs": epochs,
                        "step": train["nonfinite_batch"], "steps": steps, "loss": train["loss"]},
                       journal.checkpoints.latest_path() if journal is not None else None)
    val = trainer.evaluate(data.eval_batches("val"))
    metric = trainer.hooks.site_metric
    record = {**tag, "epoch": epoch + 1, "lr": lr,
              "train_loss": train["loss"], "train_acc": train["acc"],
              "val_loss": val["loss"], "val_acc": val["acc"],
              "seconds": train["seconds"], "img_s": train["img_s"],
              **({metric: train["sites"]} if metric else {}), **train["terms"]}
    bar.update()
    bar.set_postfix(loss=f"{train['loss']:.3f}", acc=f"{train['acc']:.1f}",
                    val=f"{val['acc']:.1f}")
    stop = bool(on_epoch is not None and on_epoch(epoch, record, records))
    records.append(record)
    if journal is not None:
        journal.write(record)
        journal.save(trainer, tag, epochs, records, stop,
                     data_position={"epoch": epoch_offset + epoch + 1, "batch": 0})
    return stop


def evaluate_model(m, train_cfg, data: Data, mesh, splits=("val", "test")) -> dict:
    """Eval-mode accuracy (percent) and loss of `m` on each split:
    {"val_acc", "val_loss", "test_acc", "test_loss"}."""
    trainer = Trainer(m, train_cfg, steps_per_epoch=1, mesh=mesh)
    trainer.start_round()
    out = {}
    for split in splits:
        r = trainer.evaluate(data.eval_batches(split))
        out[f"{split}_acc"], out[f"{split}_loss"] = r["acc"], r["loss"]
    return out
