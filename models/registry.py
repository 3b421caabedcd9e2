"""One entry point for every architecture: `create(name, num_classes=..., seed=..., **options)`.

Each family module registers its builders with `@register(name, sites=..., detect=...,
blocks=...)`.
`detect(state_dict, module)` returns the `create` keyword arguments
(`num_classes` and options such as `width`) when the torch state dict (and the
torch module, when one was given, else None) is of this architecture, else
None. `converters.from_torch` uses it to size the model, and to find the
architecture when no `arch` is given (entries registered with `auto=False`
match a state dict only by name, as their weights look like another entry's;
given a torch module, their detect may still claim it from what the module
shows, e.g. a stride). `blocks(m)` (optional) lists a built model's residual
blocks (`models.net.Block`), for methods that work block by block (DepthShrinker).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from typing import Callable

from jaxprune.errors import UserError, closest

from models.net import Block, Net


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[..., Net]
    detect: Callable[[dict, object], dict | None] | None
    auto: bool
    sites: int  # the documented site count (DESIGN.md §4), checked by the tests
    doc: str
    blocks: Callable[[Net], list[Block]] | None = None


_REGISTRY: dict[str, Entry] = {}


def register(name: str, *, sites: int, detect=None, auto: bool = True, blocks=None):
    def deco(fn):
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = Entry(name, fn, detect, auto, sites, doc, blocks)
        return fn
    return deco


def _load_families() -> None:
    """Import every module of the `models` package: the family modules' @register
    decorators fill the registry."""
    import models
    for info in pkgutil.iter_modules(models.__path__):
        if not info.ispkg:
            importlib.import_module(f"models.{info.name}")


def available() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def entry(name: str) -> Entry:
    _load_families()
    if name.startswith("torch:"):  # converters.torch_factory's names: no builder, no blocks
        raise UserError(f"model {name!r} is a torch model imported through its graph "
                        f"(converters.trace), not a registered architecture; this needs one "
                        f"of {sorted(_REGISTRY)}")
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; {closest(name, _REGISTRY)}")
    return _REGISTRY[name]


def create(name: str, num_classes: int = 1000, seed: int = 0, **options) -> Net:
    """Build model `name` with fresh weights. Options are family-specific (e.g. `width`)."""
    e = entry(name)
    params = inspect.signature(e.build).parameters
    valid = [p for p in params if p not in ("num_classes", "seed")]
    for key in options:
        if key not in params:
            raise UserError(f"model {name!r} has no option {key!r}; valid options: {valid}")
    return e.build(num_classes=num_classes, seed=seed, **options)


def match(state: dict, module=None) -> tuple[str, dict] | None:
    """(arch, create kwargs) of the registered architecture these torch weights (and
    module, when given) are, else None."""
    _load_families()
    for name, e in _REGISTRY.items():
        # A module shows what a state dict cannot (e.g. strides), so name-only entries
        # may claim a module; their detect must then check it.
        if e.detect is not None and (e.auto or module is not None):
            kwargs = e.detect(state, module)
            if kwargs is not None:
                return name, kwargs
    return None


def detect(state: dict, module=None, arch: str | None = None) -> tuple[str, dict]:
    """(arch, create kwargs) of torch weights, or a UserError saying what the weights are
    and what to do: with `arch` named, the architecture they are when it is another; when
    none fits, what their keys look like against what the architecture expects."""
    found = match(state, module)
    if arch is None:
        if found is not None:
            return found
        raise UserError("could not recognise the architecture of these torch weights: "
                        f"{_keys_against(state, None)}")
    e = entry(arch)
    kwargs = e.detect(state, module) if e.detect else None
    if kwargs is not None:
        return arch, kwargs
    if found is not None:
        raise UserError(f"these torch weights are a {found[0]!r} {found[1]}, not a {arch!r}: "
                        f"pass arch={found[0]!r}, or leave arch out")
    raise UserError(f"these torch weights are not a {arch!r}: {_keys_against(state, arch)}")


def _keys_against(state: dict, arch: str | None) -> str:
    """What the keys of `state` look like when no known architecture fits them; a prefix
    every key shares (a training wrapper's) is named, with how to strip it."""
    keys = sorted(state)
    if not keys:
        return "the state dict is empty"
    shown = ", ".join(repr(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
    heads = {k.split(".", 1)[0] for k in keys}
    if len(heads) == 1 and len(keys) > 1:
        prefix = heads.pop() + "."
        return (f"every key starts with {prefix!r} ({shown}), a prefix a training wrapper adds "
                f"and no architecture has: strip it, "
                f"{{k.removeprefix({prefix!r}): v for k, v in state.items()}}, and load that")
    known = ", ".join(sorted(_REGISTRY))
    if arch is not None:
        return (f"their keys or shapes ({shown}) fit neither it nor any other known "
                f"architecture ({known}): weights of another or a modified network")
    return (f"their keys or shapes ({shown}) fit none of the known architectures ({known}): "
            f"weights of another or a modified network")


def blocks(m: Net) -> list[Block]:
    """The residual blocks of a built model, in order; a UserError for an architecture
    that declares none (see `register(blocks=...)`)."""
    e = entry(m.spec.arch)
    if e.blocks is None:
        with_blocks = sorted(n for n, x in _REGISTRY.items() if x.blocks is not None)
        raise UserError(f"model {m.spec.arch!r} declares no blocks; models that do: {with_blocks}")
    return e.blocks(m)
