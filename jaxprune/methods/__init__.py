"""Depth-reduction methods, registered by name (`easier`, `depthshrinker`, `snl`,
`layermerge`, `parity`).

A method is a package `jaxprune/methods/<name>/`. Its `__init__.py` holds only
its options (a frozen dataclass of the config's `method:` keys, subclassing
`jaxprune.config.MethodConfig`) and registers them:

    @register("easier", run="jaxprune.methods.easier.method")
    @dataclasses.dataclass(frozen=True)
    class EasierConfig(MethodConfig): ...

so validating a config imports no training code. Every package here is found
and imported on the first lookup. The module named by `run` defines
`run(ctx: RunContext) -> MethodResult` (`jaxprune.context`); it is imported
when the method runs. Pieces several methods share sit beside the
packages: `pretrain.py` (the original network), `distillation.py`,
`fuse_export.py` (fuse, profile, export and its report section).
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable

from jaxprune.errors import UserError, closest


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    config: type      # dataclass of this method's `method:` keys (besides `name`)
    module: str       # the module whose `run(ctx)` runs it

    @property
    def run(self) -> Callable:
        return importlib.import_module(self.module).run


_METHODS: dict[str, Method] = {}


def register(name: str, *, run: str):
    """Class decorator for a method's options dataclass; `run` names the module that
    defines the method's `run(ctx)`."""
    def deco(cls):
        _METHODS[name] = Method(name, cls, run)
        return cls
    return deco


def _load() -> None:
    """Import every method package (its __init__ registers its options)."""
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            importlib.import_module(f"{__name__}.{info.name}")


def available() -> list[str]:
    _load()
    return sorted(_METHODS)


def get(name: str) -> Method:
    _load()
    if name not in _METHODS:
        raise UserError(f"unknown method {name!r} (method.name); {closest(name, _METHODS)}")
    return _METHODS[name]
