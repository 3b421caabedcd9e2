"""The step that makes a network shallower: fold, fuse, profile (DESIGN.md §7).

    small, report = jaxprune.merge(m, return_report=True)   # new Net, same function
    print(report)                                           # depth/params/MACs before and after
    jaxprune.profile(small, (32, 32))

The passes load on first use, so that reading `COST_MODELS` (config validation)
imports no JAX.
"""
import importlib

# How `merge` decides which linear runs to fuse (see `merging.fuse`).
COST_MODELS = ("macs", "latency", "none")

_EXPORTS = {"MergeReport": "jaxprune.merging.fuse", "merge": "jaxprune.merging.fuse",
            "Profile": "jaxprune.merging.profiling", "profile": "jaxprune.merging.profiling"}

__all__ = ["COST_MODELS", *sorted(_EXPORTS)]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxprune.merging' has no attribute {name!r}")
