"""The torch boundary: weights in (`from_torch`), models out (`to_torch`, `export`).

The names load on first use, so that a module of this package imports only what it
needs: `converters.torch_reference` (the torch originals) runs in a torch-only process
without JAX (the timing workers of `jaxprune.measure`).
"""
import importlib

_EXPORTS = {"from_torch": "converters.torch_in", "load_state": "converters.torch_in",
            "read_file": "converters.torch_in", "torch_state_dict": "converters.torch_in",
            "load_pretrained": "converters.pretrained",
            "to_torch": "converters.torch_out", "export": "converters.torch_out",
            "to_torchvision": "converters.torch_out",
            "trace": "converters.torch_graph", "from_program": "converters.torch_graph"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'converters' has no attribute {name!r}")
