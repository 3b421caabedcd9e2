"""Torch weights into jaxprune models.

Accepted: a torch module (torchvision, timm), a state dict, or a path to a
`.pth` / `.pt` / `.safetensors` file or an exported folder (`arch.json` +
`model.safetensors`). Files are never unpickled: `torch.load(weights_only=True)`
or safetensors only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxprune.errors import UserError
from models.net import Net
from models.registry import create, detect, match

# torch keeps a step counter in every BatchNorm; it carries no information here.
_DROPPED_SUFFIXES = ("num_batches_tracked",)
# Wrappers that training scripts commonly put around a state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")


def _to_numpy(state: dict) -> dict[str, np.ndarray]:
    out = {}
    for k, v in state.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        out[k] = np.asarray(v)
    return out


def _unwrap(obj: Any, source: str) -> dict:
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                return _unwrap(obj[key], source)
        if obj and all(isinstance(k, str) for k in obj):
            # DataParallel / DDP checkpoints prefix every key with 'module.'
            if all(k.startswith("module.") for k in obj):
                obj = {k[len("module."):]: v for k, v in obj.items()}
            return obj
    raise UserError(f"{source}: expected a state dict (a mapping of parameter names to "
                    f"tensors), got {type(obj).__name__}")


def read_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict | None]:
    """(state dict as NumPy arrays, arch.json contents or None) from a file or export folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"torch weights not found: {path}")
    arch = None
    if path.is_dir():
        arch_file, weights = path / "arch.json", path / "model.safetensors"
        if not (arch_file.exists() and weights.exists()):
            raise UserError(f"{path} is a folder but not a jaxprune export "
                            "(expected arch.json and model.safetensors in it)")
        try:
            arch = json.loads(arch_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{arch_file} is not valid JSON ({e}); re-export the model") from None
        path = weights
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            return load_file(str(path)), arch
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({e}); "
                            "it may be truncated: re-download or re-export it") from None
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        import pickle
        import re
        import warnings

        import torch
        try:
            with warnings.catch_warnings():  # e.g. "Detected pickle protocol": the error says it
                warnings.simplefilter("ignore")
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's own text advises weights_only=False, the opposite of what to do here
            wanted = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            what = f" (it asks for {wanted.group(1)})" if wanted else ""
            raise UserError(f"{path} holds Python objects besides tensors{what} and was refused "
                            "without being run; save a plain state dict "
                            "(torch.save(model.state_dict(), ...)) or safetensors") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            reason = str(e).splitlines()[0].split(". ")[0]
            raise UserError(f"{path} is not a readable torch file ({reason}); "
                            "it may be truncated: re-download or re-save it") from None
        return _to_numpy(_unwrap(obj, str(path))), arch
    raise UserError(f"{path}: unsupported weights file type {suffix!r}; "
                    "expected .pth, .pt, .safetensors or an exported folder")


def load_state(m: Net, state: dict[str, np.ndarray], source: str = "torch weights") -> Net:
    """Copy a torch state dict into `m` after checking every key and shape."""
    state = {k: v for k, v in state.items() if not k.endswith(_DROPPED_SUFFIXES)}
    expected: dict[str, tuple] = {}
    for name, layer in m.named_layers():
        for suffix, arr in layer.torch_state().items():
            expected[f"{name}.{suffix}"] = arr.shape
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise UserError(f"{source} do not fit {m.spec.arch!r}: " + "; ".join(parts)
                        + " (wrong arch=, or weights of a modified model?)")
    wrong = [k for k, shape in expected.items() if tuple(state[k].shape) != tuple(shape)]
    if wrong:
        k = wrong[0]
        more = f"; {len(wrong) - 1} more keys differ" if len(wrong) > 1 else ""
        raise UserError(f"{source} do not fit {m.spec.arch!r}: '{k}' has shape "
                        f"{tuple(state[k].shape)}, the model expects {tuple(expected[k])}{more} "
                        "(wrong architecture or width?)")
    for name, layer in m.named_layers():
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)
               and k[len(prefix):] in layer.torch_state()}
        if own:
            layer.load_torch_state(own, name)
    return m


def from_torch(obj: Any, arch: str | None = None) -> Net:
    """A jaxprune model holding the weights of `obj` (module, state dict or file path).

    The class count comes from the classifier's shape; the architecture is
    detected from the weights unless `arch` names it. A module of no registered
    architecture is traced (`converters.trace`, at 224x224).
    """
    module, source, spec = None, "torch weights", None
    if isinstance(obj, (str, os.PathLike)):
        source = str(obj)
        state, spec = read_file(obj)
    elif hasattr(obj, "state_dict") and callable(obj.state_dict):
        module, source = obj, type(obj).__name__
        state = _to_numpy(obj.state_dict())
    elif isinstance(obj, dict):
        state = _to_numpy(_unwrap(obj, "state dict"))
    else:
        raise UserError(f"from_torch takes a torch module, a state dict or a file path, "
                        f"not {type(obj).__name__}")
    if spec is not None and "graph" in spec:  # an export describes its whole graph (fused too)
        from converters.torch_arch import net_from_arch
        return net_from_arch(spec, source, state)
    if spec is not None:  # an exported folder names its own architecture
        return load_state(create(spec["arch"], num_classes=spec["num_classes"], **spec["options"]),
                          state, source)
    if module is not None and arch is None and match(state, module) is None:
        from converters.torch_graph import trace  # no builder knows it: import its graph
        return trace(module)
    name, kwargs = detect(state, module, arch)
    from converters.torch_arch import with_weights
    return with_weights(lambda: create(name, **kwargs), state, source)


def torch_state_dict(m: Net, with_counters: bool = False) -> dict[str, np.ndarray]:
    """`m`'s weights as a torch-layout state dict of NumPy arrays.

    `with_counters=True` regenerates BatchNorm's `num_batches_tracked` (0), so
    `torch_module.load_state_dict(..., strict=True)` accepts the result.
    """
    from models.layers import BatchNorm
    out = {}
    for name, layer in m.named_layers():
        for suffix, arr in layer.torch_state().items():
            out[f"{name}.{suffix}"] = arr
        if with_counters and isinstance(layer, BatchNorm):
            out[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
    return out
