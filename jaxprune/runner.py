"""The run: from a validated config to a run folder, a method run and its written results.

    cfg = config.load("configs/demo.yaml")
    print(plan(cfg))             # what a run would do; reads no data, trains nothing
    run_dir, results = run(cfg)  # <out>/<name>/: config.yaml, the method, results.json, report.md

`run` owns the run: it checks the model, makes (or reuses) the run folder,
builds the `RunContext` (`jaxprune.context`), calls the method's `run(ctx)`
and writes the `MethodResult` it returns (results.json, report.md, figures).
A run folder belongs to one resolved config. Running the same config again
calls the method again in the same folder (methods resume where they can); a
different config is refused rather than mixing two experiments in one folder.
"""
from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from jaxprune import config, distributed
from jaxprune.config import Config
from jaxprune.context import RunContext, build_model
from jaxprune.errors import UserError

CONFIG_FILE = "config.yaml"
# Keys that say where a run lives, not what it computes: they may differ on a resume.
_LOCATION_KEYS = ("out", "name")


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
    (unknown name, option or option value). Shapes only: no weights are initialised. A
    torch model is found here (its factory or file) and imported when the method builds it,
    before any training."""
    import models
    from flax import nnx
    if cfg.model.source is not None:
        from converters.torch_program import load_program
        load_program(cfg.model.source)
        return
    from converters.torch_factory import PREFIX, factory
    if cfg.model.name.startswith(PREFIX):
        factory(cfg.model.name)
        return
    nnx.eval_shape(lambda: models.create(cfg.model.name, seed=cfg.seed, **cfg.model.options))


def run(cfg: Config) -> tuple[Path, dict]:
    """Run the config's method in its run folder and write what it returns; returns
    (run folder, results). A method whose final check failed (`MethodResult.failure`)
    still gets its files written, then raises a UserError with its message."""
    from jaxprune import methods, report
    from jaxprune.train import Diverged
    method = methods.get(cfg.method.name)
    check_model(cfg)
    path, state = prepare_run_dir(cfg)
    ctx = RunContext(cfg, path)
    try:
        result = method.run(ctx)
    except Diverged as e:
        report.write_stopped(path, str(e))
        raise
    except UserError:
        if state == "new":
            _forget(path)
        raise
    result.results["seconds"] = ctx.elapsed()
    report.write(path, result.results, result.report, seconds=result.results["seconds"])
    if result.failure:
        raise UserError(result.failure)
    return path, result.results


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

    from converters.torch_factory import PREFIX
    from jaxprune import data
    state = check_run_dir(cfg)  # a refusal first: it is what the run would hit first
    desc = data.describe(cfg.data.name, cfg.data.root)
    n = cfg.model.num_classes or desc.num_classes
    size = (cfg.data.image_size,) * 2 if cfg.data.image_size else tuple(desc.image_size)
    classes = f"{n} classes"
    ref = cfg.model.pretrained
    if ref and not ref.startswith("torchvision:"):
        m = build_model(cfg, n, size)  # reads the file and checks every key and shape
        weights = f"weights from {ref} (read and checked)"
    else:
        # Shapes only: the plan needs the graph, not initialised weights (seconds on CPU).
        # A torch model's graph comes from tracing it, with the weights it has anyway.
        no_download = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None))
        if cfg.model.name.startswith(PREFIX):
            m = build_model(no_download, n, size)
        else:
            m = nnx.eval_shape(lambda: build_model(no_download, n, size))
        weights = (f"weights {ref} (downloaded when the run starts)" if ref
                   else f"fresh weights (seed {cfg.seed})")
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    names = m.sites()
    method_opts = {k: v for k, v in config.to_dict(cfg.method).items() if k != "name"}
    (h, w), splits = desc.image_size, ", ".join(f"{k} {v}" for k, v in desc.splits.items())
    # describe() succeeds without a root only for a data set that ships with the code
    where = f"read from {cfg.data.root}" if cfg.data.root else "built in, no download"
    data_line = (f"{cfg.data.name}: {desc.num_classes} classes, {h}x{w}x{desc.channels} images, "
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
        f"data:   {data_line}",
        f"run folder: {folder}",
    ]
    return "\n".join(lines)
