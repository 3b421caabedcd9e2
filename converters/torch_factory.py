"""Models a config names by their torch code: `model.name: torch:<module>:<factory>` and
`model.source: <file>.pt2`.

    model:
      name: torch:torchvision.models:resnet50   # imports torchvision.models, calls resnet50(...)
      options: {}                               # keyword arguments of the factory

    model:
      source: exported/model.pt2                # a saved torch.export program

A `torch:` name imports the module (torchvision and timm through
`jaxprune.torch_compat`), calls the factory with `model.options` (and
`num_classes` when it takes one) after seeding torch with the run's seed, and
traces the module it returns (`converters.trace`). A `.pt2` file is read by
`converters.torch_program.load_program`, which runs no code from the file.
Both are imported at the run's image size.

Naming a factory runs that module's code, as `python -m` would: a config names
code the user trusts. Modules of the Python standard library are refused.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

from jaxprune.errors import UserError
from models.net import Net

PREFIX = "torch:"


def factory(name: str):
    """The callable a `torch:<module>:<factory>` name (prefix optional) names."""
    spec = name[len(PREFIX):] if name.startswith(PREFIX) else name
    module_name, _, attr = spec.partition(":")
    example = "torch:torchvision.models:resnet50"
    if not module_name or not attr:
        raise UserError(f"model.name {name!r}: a torch model is named "
                        f"torch:<module>:<factory>, e.g. {example}")
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names:
        raise UserError(f"model.name {name!r}: {module_name} is a Python standard library "
                        f"module, not a model's; name a factory such as {example}")
    from jaxprune import torch_compat
    if top in ("torchvision", "timm"):  # they import only through the workaround
        getattr(torch_compat, top)()
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"model.name {name!r}: cannot import {module_name} ({e}); install it "
                        f"or put it on PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"model.name {name!r}: {module_name} has no {attr!r}; name a "
                            f"model factory or nn.Module class of it")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"model.name {name!r}: {module_name}.{attr} is not callable")
    return obj


def _takes(fn, keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_module(name: str, *, num_classes: int | None = None, seed: int = 0, options=None):
    """The torch module `name` makes, seeded by `seed`, with `options` (and `num_classes`
    when the factory takes it)."""
    import torch
    fn = factory(name)
    kwargs = dict(options or {})
    if num_classes is not None and "num_classes" not in kwargs and _takes(fn, "num_classes"):
        kwargs["num_classes"] = num_classes
    torch.manual_seed(seed)
    try:
        module = fn(**kwargs)
    except TypeError as e:
        raise UserError(f"model.name {name!r}: calling it with {kwargs} failed ({e}); check "
                        f"model.options") from None
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"model.name {name!r} made a {type(module).__name__}, not a "
                        f"torch.nn.Module")
    return module


def build(name: str, *, source: str | None = None, num_classes: int | None = None,
          seed: int = 0, options=None, input_size=(224, 224)) -> Net:
    """The jaxprune model of a config's `model.name` (`torch:...`) or `model.source` (a
    `.pt2` file), imported at `input_size` (H, W). A UserError when its class count is
    not `num_classes`, or when it cannot be imported (naming what and why)."""
    from converters.torch_graph import from_program, trace
    if source is not None:
        from converters.torch_program import load_program
        if options:
            raise UserError(f"model.options {dict(options)} do not apply to model.source "
                            f"(a saved program has no factory to pass them to); remove them")
        m = from_program(load_program(source), arch=name, input_size=input_size,
                         what=Path(source).name)
    else:
        module = build_module(name, num_classes=num_classes, seed=seed, options=options)
        m = trace(module, tuple(input_size), arch=name)
    if num_classes is not None and m.spec.num_classes != num_classes:
        raise UserError(f"{source or name} has {m.spec.num_classes} classes, the task "
                        f"{num_classes}: set model.num_classes: {m.spec.num_classes}, or "
                        f"give the factory a num_classes argument")
    return m
