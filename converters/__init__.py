"""The torch boundary: weights in (`from_torch`), models out (`to_torch`, `export`)."""
from converters.pretrained import load_pretrained
from converters.torch_in import from_torch, load_state, read_file, torch_state_dict

__all__ = ["from_torch", "load_pretrained", "load_state", "read_file", "torch_state_dict"]
