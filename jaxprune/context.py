"""The contract between the runner and a method.

The runner (`jaxprune.runner.run`) validates the config, makes the run folder
and hands the method a `RunContext`; the method runs and returns a
`MethodResult`, from which the runner writes results.json, report.md and the
figures. A method never imports the runner and never writes those files.

    def run(ctx: RunContext) -> MethodResult:
        m = ctx.build_model()                   # the config's model (pretrained when asked)
        trainer = Trainer(m, ctx.cfg.train, steps_per_epoch=ctx.data.steps_per_epoch(),
                          mesh=ctx.mesh)
        ...
        return MethodResult(results, Report(title, sections))

Everything here is made on first use: a method that reads no data (`parity`)
never touches the data set.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

from jaxprune.config import Config
from jaxprune.distributed import is_main
from jaxprune.files import write_json_atomic
from jaxprune.report import Report


@dataclasses.dataclass
class MethodResult:
    """What a method returns: `results` (results.json, DESIGN.md §9), its `report`, and
    `failure`, a message when the method ran to the end but its check failed (the
    runner writes both files, then exits with status 2 and that message)."""
    results: dict
    report: Report
    failure: str | None = None


@dataclasses.dataclass
class RunContext:
    """The run a method works in: its validated config, its run folder, its class count
    (`model.num_classes`, else the data set's; `jaxprune.preflight` found it), and (made on
    first use) the device mesh, the data set, the journal of epochs and a clock."""
    cfg: Config
    run_dir: Path
    num_classes: int
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @functools.cached_property
    def mesh(self):
        """A 1-D data-parallel mesh over every device of every process."""
        from jaxprune.train import make_mesh
        return make_mesh()

    @functools.cached_property
    def data(self):
        """The config's data set as loaders of global batches (`jaxprune.train.Data`)."""
        from jaxprune.train import Data
        return Data(self.cfg, self.mesh)

    @functools.cached_property
    def journal(self):
        """`metrics.jsonl` and the per-epoch train checkpoints (`jaxprune.train.Journal`)."""
        from jaxprune.train import Journal
        return Journal(self.run_dir)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images the loaders produce: `data.image_size`, else the data set's."""
        s = self.cfg.data.image_size
        return tuple(self.data.info.image_size) if s is None else (s, s)

    def build_model(self):
        """The config's model, fresh: `model.name` with `model.options`, `num_classes`
        classes, seeded by `seed`, loaded from `model.pretrained` when given (a torch
        model is imported at the run's image size)."""
        return build_model(self.cfg, self.num_classes, self.image_size)

    def checkpoints(self, stage: str):
        """Model checkpoints of one stage or of the rounds (`checkpoints/<stage>/`)."""
        from jaxprune.train.checkpoint import Checkpoints
        return Checkpoints(self.run_dir / "checkpoints" / stage)

    def log(self, message: str) -> None:
        """A progress line, printed once (by process 0)."""
        if is_main():
            print(message, flush=True)

    def write_json(self, name: str, obj) -> Path:
        """A method's own file in the run folder (process 0 writes it)."""
        path = self.run_dir / name
        if is_main():
            write_json_atomic(path, obj)
        return path

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.started


def build_model(cfg: Config, num_classes: int, image_size: tuple[int, int] = (224, 224)):
    """`model.name` with `model.options` and `num_classes` classes, seeded by `seed`,
    starting from `model.pretrained` when given. A torch model (`torch:<module>:<factory>`
    or `model.source`, `converters.torch_factory`) is imported at `image_size`."""
    import models
    from converters import load_pretrained
    from converters.torch_factory import PREFIX
    if cfg.model.name.startswith(PREFIX):
        from converters.torch_factory import build
        m = build(cfg.model.name, source=cfg.model.source, num_classes=num_classes,
                  seed=cfg.seed, options=cfg.model.options, input_size=image_size)
    else:
        m = models.create(cfg.model.name, num_classes=num_classes, seed=cfg.seed,
                          **cfg.model.options)
    if cfg.model.pretrained:
        load_pretrained(m, cfg.model.pretrained)
    return m
