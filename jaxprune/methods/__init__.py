"""Depth-reduction methods, registered by name (`easier`, `depthshrinker`, `snl`).

A method module calls `register(name, config=OptionsDataclass)` on a function
`run(cfg, run_dir) -> dict` (the results written to results.json). The options
dataclass holds the method's own keys of the config's `method:` section.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from jaxprune.errors import UserError, closest


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    run: Callable
    config: type  # dataclass of this method's `method:` keys (besides `name`)


_METHODS: dict[str, Method] = {}
# Modules that register methods; imported on first lookup so a CLI start stays fast.
_MODULES = ("jaxprune.methods.easier", "jaxprune.methods.depthshrinker",
            "jaxprune.methods.snl", "jaxprune.methods.parity")


def register(name: str, *, config: type):
    def deco(fn):
        _METHODS[name] = Method(name, fn, config)
        return fn
    return deco


def _load() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real import error inside an existing method module
                raise


def available() -> list[str]:
    _load()
    return sorted(_METHODS)


def get(name: str) -> Method:
    _load()
    if name not in _METHODS:
        raise UserError(f"unknown method {name!r} (method.name); {closest(name, _METHODS)}")
    return _METHODS[name]
