"""The torch boundary: weights in (`from_torch`), models out (`to_torch`, `export`)."""
from converters.pretrained import load_pretrained
from converters.torch_in import from_torch, load_state, read_file, torch_state_dict

# Loaded on first use: they import torch and the merge pass.
_LAZY = {"to_torch": "converters.torch_out", "export": "converters.torch_out",
         "to_torchvision": "converters.torch_out", "trace": "converters.torch_graph",
         "from_program": "converters.torch_graph"}

__all__ = ["export", "from_program", "from_torch", "load_pretrained", "load_state", "read_file",
           "to_torch", "to_torchvision", "torch_state_dict", "trace"]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'converters' has no attribute {name!r}")
