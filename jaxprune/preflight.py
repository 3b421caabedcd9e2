"""Every check of a run that needs more than its config, in one place, before any work.

`jaxprune.config` checks each key's range, and the rules between keys, when a
config is read. What the config alone cannot tell is checked here, by `check(cfg)`:

* the run folder: `out` can be made (or is a folder we may write in), and
  `<out>/<name>` is new or holds a run of this same config;
* the data set (for methods that read one): it is on disk; its class count is
  the model's (`model.num_classes`, when set); its training split holds at
  least one batch;
* the machine: every batch splits evenly over the devices (data parallelism);
* the model: it builds with its options, its weights file fits it, it takes
  the images it will be fed, and it has what the method needs
  (`MethodConfig.check_model`);
* the method's own input files (`MethodConfig.inputs`).

`runner.run` calls it before it reads any data or makes the run folder, and
the dry run (`runner.plan`) prints what it found, so a dry run that passes
means the run starts: it can then fail only for what happens during the work
(a full disk, a diverging loss, an interruption). An input that is not on
disk (`MissingInput`: a data set not prepared, a weights file not downloaded)
refuses a run but is one line of a dry run's plan, with the command or path
that provides it, so a config can be checked on a machine without its data.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax

from jaxprune.config import Config, is_file_reference
from jaxprune.errors import MissingInput, UserError


@dataclasses.dataclass
class Preflight:
    """What `check` found: the facts the plan prints and the run starts from."""
    run_dir: Path
    state: str                 # 'new' or 'resume' (`runner.check_run_dir`)
    info: object | None        # the data set's `DatasetInfo`; None: not read, or missing
    num_classes: int
    model: object              # the config's model: its weights real when read from a file
    weights: str               # where the weights come from, for a person
    input_sizes: list          # the (H, W) the model is fed
    devices: int               # devices a batch is split over (every process's, once joined)
    missing: list[str]         # inputs not on disk, each one line with its fix

    def refuse_missing(self) -> None:
        """A run cannot start without its inputs: the first missing one as a UserError."""
        if self.missing:
            raise MissingInput(self.missing[0])


def check(cfg: Config) -> Preflight:
    """Run every check above; a UserError for the first that fails. Missing inputs are
    collected in `Preflight.missing` instead (a run refuses them: `refuse_missing`)."""
    from jaxprune.runner import check_run_dir, run_dir_of
    run_dir = run_dir_of(cfg)
    state = check_run_dir(cfg)  # an existing run folder: this config's run, or a refusal
    _check_can_write(run_dir)
    missing: list[str] = []
    info, num_classes = _data(cfg, missing)
    model, weights = _model(cfg, num_classes, info, missing)
    sizes = (cfg.method.input_sizes(cfg, model.spec.input_size)
             or [_image_size(cfg, info, tuple(model.spec.input_size))])
    for hw in sizes:
        _check_takes(cfg, model, hw)
    cfg.method.check_model(cfg, model)
    for key, path in cfg.method.inputs().items():
        if not Path(path).exists():
            missing.append(f"{key}: {path} not found; correct {key}")
    devices = jax.device_count()
    if cfg.method.reads_data:
        _check_batches(cfg, info, devices)
    return Preflight(run_dir, state, info, num_classes, model, weights, sizes, devices, missing)


def _check_can_write(run_dir: Path) -> None:
    """`run_dir` is a folder we may write in, or can be made: its nearest existing
    ancestor is a folder we may write in."""
    path = run_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise UserError(f"cannot make the run folder {run_dir}: {path} is a file, not a "
                        f"folder; set another out (--out) or name")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the run folder {run_dir}: no permission to write in "
                        f"{path}; set another out (--out) or name")


def _data(cfg: Config, missing: list[str]):
    """(the data set's info or None, the model's class count: `model.num_classes`, else the
    data set's; its published count when it is not read)."""
    from jaxprune import data
    from jaxprune.data.sources import spec
    s = spec(cfg.data.name)  # an unknown name is refused whatever the root
    if not cfg.method.reads_data:
        return None, cfg.model.num_classes or s.num_classes
    try:
        info = data.describe(cfg.data.name, cfg.data.root)
    except MissingInput as e:
        missing.append(str(e))
        return None, cfg.model.num_classes or s.num_classes
    n = cfg.model.num_classes
    if n is not None and n != info.num_classes:
        raise UserError(f"the data set {cfg.data.name} has {info.num_classes} classes, the model "
                        f"{n} (model.num_classes): set model.num_classes to {info.num_classes}, "
                        f"or to null for the data set's count (a pretrained classifier of "
                        f"another size is then re-initialised)")
    return info, n or info.num_classes


def _model(cfg: Config, num_classes: int, info, missing: list[str]):
    """(the config's model, a line saying where its weights come from). A weights file is
    read (every key and shape checked); otherwise only shapes are built, except for a torch
    model (`torch:` names, `model.source`): its graph comes from tracing it, at the run's
    image size, with the weights it has anyway."""
    from flax import nnx

    from converters.torch_factory import PREFIX
    from jaxprune.context import build_model
    ref = cfg.model.pretrained
    traced = cfg.model.name.startswith(PREFIX)
    size = _image_size(cfg, info, (224, 224))  # a torch model's size before it is traced
    if is_file_reference(ref) and Path(ref).exists():
        return build_model(cfg, num_classes, size), f"weights from {ref} (read and checked)"
    if is_file_reference(ref):
        missing.append(f"model.pretrained: {ref} not found; download the weights there or "
                       f"correct the path")
        weights = f"weights from {ref} (not found)"
    elif ref:
        weights = f"weights {ref} (downloaded when the run starts)"
    else:
        weights = f"fresh weights (seed {cfg.seed})"
    # Shapes only: the plan needs the graph, not initialised weights.
    shapes = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None))
    if traced:
        return build_model(shapes, num_classes, size), weights
    try:
        return nnx.eval_shape(lambda: build_model(shapes, num_classes)), weights
    except (ValueError, TypeError, ZeroDivisionError) as e:  # a bad option value (width 0)
        raise UserError(f"model {cfg.model.name} cannot be built with options "
                        f"{dict(cfg.model.options)} ({type(e).__name__}: {e}); correct "
                        f"model.options") from None


def _image_size(cfg: Config, info, missing_data: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) the loaders produce: data.image_size, else the data set's, else
    `missing_data` (the data set is not on disk, or not read)."""
    if cfg.data.image_size is not None:
        return cfg.data.image_size, cfg.data.image_size
    return tuple(info.image_size) if info is not None else missing_data


def _check_takes(cfg: Config, model, hw: tuple[int, int]) -> None:
    """The model runs on a batch of `hw` images (shapes only: nothing is computed)."""
    from flax import nnx
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, *hw, model.spec.in_channels), jax.numpy.float32)
    try:
        jax.eval_shape(lambda s, v: nnx.merge(graphdef, s)(v), state, x)
    except (ValueError, TypeError) as e:  # e.g. a feature map that shrinks below one pixel
        reason = " ".join(str(e).split())[:200]
        raise UserError(f"model {cfg.model.name} cannot take {hw[0]}x{hw[1]} images "
                        f"({type(e).__name__}: {reason}); use a larger data.image_size") from None


def _multiples(n: int, k: int) -> str:
    low, high = n // k * k, (n // k + 1) * k
    return f"{low} or {high}" if low else f"{high}"


def _check_batches(cfg: Config, info, devices: int) -> None:
    """Every batch splits evenly over the devices; the training split holds a batch."""
    d = cfg.data
    for key, batch in (("data.batch_size", d.batch_size), ("data.eval_batch_size",
                                                              d.eval_batch_size)):
        if batch is not None and batch % devices:
            raise UserError(f"{key} {batch} is not a multiple of the {devices} devices (every "
                            f"batch is split evenly over them); use {_multiples(batch, devices)}")
    if info is not None and info.splits["train"] < d.batch_size:
        raise UserError(f"the {d.name} training split has {info.splits['train']} examples, fewer "
                        f"than one batch of {d.batch_size} (data.batch_size); lower it")
