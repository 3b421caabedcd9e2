"""The run: from a validated config to a run folder, a method run and its written results.

    cfg = config.load("configs/demo.yaml")
    print(plan(cfg))             # what a run would do; reads no data, trains nothing
    run_dir, results = run(cfg)  # <out>/<name>/: config.yaml, the method, results.json, report.md

`run` owns the run: it runs every check that needs more than the config
(`jaxprune.preflight`: data, machine, model, inputs), makes (or reuses) the run folder,
builds the `RunContext` (`jaxprune.context`), calls the method's `run(ctx)`
and writes the `MethodResult` it returns (results.json, report.md, figures).
A run folder belongs to one resolved config. Running the same config again
calls the method again in the same folder (methods resume where they can); a
different config is refused rather than mixing two experiments in one folder.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from jaxprune import config, distributed
from jaxprune.config import Config
from jaxprune.context import RunContext
from jaxprune.errors import UserError
from jaxprune.files import write_text_atomic

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
        try:
            path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path / CONFIG_FILE, config.dump(cfg))
        except OSError as e:  # checked writable by the preflight: the disk itself refused
            raise UserError(f"cannot make the run folder {path} ({e.strerror or e}); free "
                            f"space there or set another out (--out)") from None
    distributed.barrier("run_dir")  # every process then finds the folder process 0 made
    return path, state


def run(cfg: Config) -> tuple[Path, dict]:
    """Run the config's method in its run folder and write what it returns; returns
    (run folder, results). Every check that needs more than the config runs first
    (`jaxprune.preflight`), before any data is read or the folder is made. A method whose
    final check failed (`MethodResult.failure`) still gets its files written, then raises
    a UserError with its message."""
    from jaxprune import methods, preflight, report
    from jaxprune.train import Diverged
    method = methods.get(cfg.method.name)
    checked = preflight.check(cfg)
    checked.refuse_missing()
    path, state = prepare_run_dir(cfg)
    ctx = RunContext(cfg, path, checked.num_classes)
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
    """Remove a run folder that holds nothing but its config.yaml: the run was refused
    before it computed anything, and the same name must stay free for the corrected config."""
    distributed.barrier("run refused")
    if distributed.is_main() and [p.name for p in path.iterdir()] == [CONFIG_FILE]:
        (path / CONFIG_FILE).unlink()
        path.rmdir()


def _options(d: dict) -> str:
    if not d:
        return "{}"
    return yaml.safe_dump(d, default_flow_style=True, sort_keys=False, width=10**6).strip()


def plan(cfg: Config) -> str:
    """What `run(cfg)` would do, for a person: model and its sites, method, data, machine,
    run folder, and the inputs not on disk yet (each with the command or path that
    provides it). Runs every check a run starts with (`jaxprune.preflight`); reads
    pretrained weights from a file to check they fit, and otherwise builds only shapes;
    downloads nothing, reads no data, trains nothing, writes nothing."""
    from flax import nnx

    from jaxprune import preflight
    from jaxprune.data.sources import spec
    checked = preflight.check(cfg)
    m = checked.model
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    names = m.sites()
    method_opts = {k: v for k, v in config.to_dict(cfg.method).items() if k != "name"}
    info = checked.info
    d = cfg.data
    if not cfg.method.reads_data:
        data_line = f"not read by {cfg.method.name}"
    elif info is None:
        data_line = f"{d.name}: not on disk (see 'missing' below)"
    else:
        (h, w), splits = info.image_size, ", ".join(f"{k} {v}" for k, v in info.splits.items())
        where = ("built in, no download" if spec(d.name).kind == "builtin"
                 else f"read from {d.root}")
        data_line = (f"{d.name}: {info.num_classes} classes, {h}x{w}x{info.channels} images, "
                     f"splits {splits}; {where}")
    sizes = ", ".join(f"{h}x{w}" for h, w in checked.input_sizes)
    where = checked.run_dir
    folder = (f"{where} (new)" if checked.state == "new"
              else f"{where} (exists with this config: the method resumes there)")
    lines = [
        f"model:  {cfg.model.name} {_options(dict(cfg.model.options))}, "
        f"{checked.num_classes} classes, {params:,} parameters, {checked.weights}; "
        f"takes {sizes} images",
        f"sites:  {len(names)}",
        textwrap.fill(", ".join(names), width=100, initial_indent="        ",
                      subsequent_indent="        "),
        f"method: {cfg.method.name} {_options(method_opts)}",
        f"data:   {data_line}",
    ]
    if cfg.method.reads_data:
        batches = ", ".join(f"{key} {b} = {b // checked.devices} per device" for key, b in
                            (("batch", d.batch_size), ("eval batch", d.eval_batch_size))
                            if b is not None)
        lines.append(f"devices: {checked.devices} ({jax.devices()[0].platform}); {batches}")
    lines.append(f"run folder: {folder}")
    if checked.missing:
        lines.append("missing (a run refuses to start without them):")
        lines += [f"  - {m}" for m in checked.missing]
    return "\n".join(lines)
