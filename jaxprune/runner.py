"""From a validated config to a model, a plan, a run folder and a method run.

    cfg = config.load("configs/demo.yaml")
    print(plan(cfg))             # what a run would do; reads no data, trains nothing
    run_dir, results = run(cfg)  # <out>/<name>/, config.yaml written, the method called

A run folder belongs to one resolved config. Running the same config again
calls the method again in the same folder (methods resume where they can); a
different config is refused rather than mixing two experiments in one folder.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import textwrap
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from jaxprune import config, distributed
from jaxprune.config import Config
from jaxprune.errors import UserError
from models.net import Net

CONFIG_FILE = "config.yaml"
# Keys that say where a run lives, not what it computes: they may differ on a resume.
_LOCATION_KEYS = ("out", "name")


def build_model(cfg: Config, num_classes: int) -> Net:
    """The config's model: `model.num_classes` (else the data set's count), `model.options`,
    seeded by `seed`, starting from `model.pretrained` when given."""
    import models
    from converters import load_pretrained
    m = models.create(cfg.model.name, num_classes=cfg.model.num_classes or num_classes,
                      seed=cfg.seed, **cfg.model.options)
    if cfg.model.pretrained:
        load_pretrained(m, cfg.model.pretrained)
    return m


def describe_data(cfg: Config):
    """`jaxprune.data.describe` of the config's data set (class count, image size, splits),
    or None where this installation has no data module. A data set that is not on disk
    raises a UserError naming where it looked and how to prepare it."""
    try:
        data = importlib.import_module("jaxprune.data")
    except ModuleNotFoundError as e:
        if e.name != "jaxprune.data":
            raise  # a real import error inside the data package
        return None
    describe = getattr(data, "describe", None)
    return describe(cfg.data.name, cfg.data.root) if describe else None


def num_classes(cfg: Config) -> int:
    """`model.num_classes`, else the data set's class count."""
    if cfg.model.num_classes:
        return cfg.model.num_classes
    desc = describe_data(cfg)
    if desc is None:
        raise UserError("model.num_classes is not set and this installation cannot read the "
                        "data set's class count; set model.num_classes")
    return int(desc.num_classes)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs (location keys ignored)."""
    fa, fb = _flatten(config.to_dict(a)), _flatten(config.to_dict(b))
    keys = [k for k in {**fa, **fb} if k not in _LOCATION_KEYS]
    return [k for k in keys if fa.get(k, "<unset>") != fb.get(k, "<unset>")]


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.out) / cfg.name


def check_run_dir(cfg: Config) -> str:
    """'new' or 'resume' for the run folder of `cfg`; a UserError when it holds another run."""
    path = run_dir_of(cfg)
    if not path.exists():
        return "new"
    if not path.is_dir():
        raise UserError(f"run folder {path} exists and is not a folder; pick another name or --out")
    saved = path / CONFIG_FILE
    if not saved.exists():
        if any(path.iterdir()):
            raise UserError(f"{path} exists, is not empty and holds no {CONFIG_FILE}: it is not a "
                            f"jaxprune run folder; pick another name or --out")
        return "new"
    try:
        old = config.load(saved)
    except UserError as e:
        raise UserError(f"{saved} cannot be read as a config ({e}); this run folder belongs to "
                        f"another version or was edited: pick another name or --out") from None
    differ = config_diff(old, cfg)
    if differ:
        shown = ", ".join(differ[:6]) + (", ..." if len(differ) > 6 else "")
        raise UserError(f"run folder {path} holds a run with a different config ({shown} differ); "
                        f"pick another name (--set name=...) or --out, or delete the folder")
    return "resume"


def prepare_run_dir(cfg: Config) -> tuple[Path, str]:
    """Create `<out>/<name>/` with the resolved config in it, or reuse it for the same config;
    returns the folder and `check_run_dir`'s 'new' or 'resume'."""
    state = check_run_dir(cfg)
    path = run_dir_of(cfg)
    distributed.barrier("run_dir checked")  # every process looked before process 0 writes
    if state == "new" and distributed.is_main():
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(config.dump(cfg))
    distributed.barrier("run_dir")  # every process then finds the folder process 0 made
    return path, state


def check_model(cfg: Config) -> None:
    """A UserError now, not after a run folder exists, when the model section cannot build
    (unknown name, option or option value). Shapes only: no weights are initialised."""
    import models
    from flax import nnx
    nnx.eval_shape(lambda: models.create(cfg.model.name, seed=cfg.seed, **cfg.model.options))


def run(cfg: Config) -> tuple[Path, dict]:
    """Run the config's method in its run folder; returns (run folder, the method's results)."""
    from jaxprune import methods, report
    from jaxprune.train import Diverged
    method = methods.get(cfg.method.name)
    check_model(cfg)
    path, state = prepare_run_dir(cfg)
    try:
        return path, method.run(cfg, path)
    except Diverged as e:
        report.write_stopped(path, str(e))
        raise
    except UserError:
        if state == "new":
            _forget(path)
        raise


def _forget(path: Path) -> None:
    """Remove a run folder that holds nothing but its config.yaml: the run was refused (bad
    data path, weights that do not fit, ...) before it computed anything, and the same name
    must stay free for the corrected config."""
    distributed.barrier("run refused")
    if distributed.is_main() and [p.name for p in path.iterdir()] == [CONFIG_FILE]:
        (path / CONFIG_FILE).unlink()
        path.rmdir()


def _options(d: dict) -> str:
    if not d:
        return "{}"
    return yaml.safe_dump(d, default_flow_style=True, sort_keys=False, width=10**6).strip()


def plan(cfg: Config) -> str:
    """What `run(cfg)` would do, for a person: model and its sites, method, data, run folder.

    Builds the model's shapes (and reads pretrained weights from a file to check
    they fit); downloads nothing, reads no data, trains nothing, writes nothing.
    """
    from flax import nnx
    state = check_run_dir(cfg)  # a refusal first: it is what the run would hit first
    desc = describe_data(cfg)
    n = cfg.model.num_classes or (desc.num_classes if desc else None)
    if n is None:  # the data set's count is unknown here: the architecture's default will do
        import models
        n = inspect.signature(models.entry(cfg.model.name).build).parameters["num_classes"].default
        classes = "classes: set by the data set"
    else:
        classes = f"{n} classes"
    ref = cfg.model.pretrained
    if ref and not ref.startswith("torchvision:"):
        m = build_model(cfg, n)  # reads the file and checks every key and shape
        weights = f"weights from {ref} (read and checked)"
    else:
        # Shapes only: the plan needs the graph, not initialised weights (seconds on CPU).
        no_download = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None))
        m = nnx.eval_shape(lambda: build_model(no_download, n))
        weights = (f"weights {ref} (downloaded when the run starts)" if ref
                   else f"fresh weights (seed {cfg.seed})")
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    names = m.sites()
    method_opts = {k: v for k, v in config.to_dict(cfg.method).items() if k != "name"}
    if desc is None:
        data = f"{cfg.data.name} (root: {cfg.data.root or 'default'})"
    else:
        (h, w), splits = desc.image_size, ", ".join(f"{k} {v}" for k, v in desc.splits.items())
        # describe() succeeds without a root only for a data set that ships with the code
        where = f"read from {cfg.data.root}" if cfg.data.root else "built in, no download"
        data = (f"{cfg.data.name}: {desc.num_classes} classes, {h}x{w}x{desc.channels} images, "
                f"splits {splits}; {where}")
    where = run_dir_of(cfg)
    folder = (f"{where} (new)" if state == "new"
              else f"{where} (exists with this config: the method resumes there)")
    lines = [
        f"model:  {cfg.model.name} {_options(dict(cfg.model.options))}, {classes}, "
        f"{params:,} parameters, {weights}",
        f"sites:  {len(names)}",
        textwrap.fill(", ".join(names), width=100, initial_indent="        ",
                      subsequent_indent="        "),
        f"method: {cfg.method.name} {_options(method_opts)}",
        f"data:   {data}",
        f"run folder: {folder}",
    ]
    return "\n".join(lines)
