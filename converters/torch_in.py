"""Torch weights into jaxprune models.

Accepted: a torch module (torchvision, timm), a state dict, or a path to a
weights file or an exported folder (`arch.json` + `model.safetensors`). A
file's type is read from its content, not its name (`model_best.pth.tar` is a
torch file): a torch file (zip or legacy pickle) is read with
`torch.load(weights_only=True)` and never unpickled otherwise; safetensors are
read as such. TorchScript and torch.export archives are recognised and refused
with the way to save their state dict. Every floating dtype torch saves
(float16, bfloat16, float64, float8 ...) is read as float32.

What training frameworks wrap around a state dict is unwrapped: checkpoint
dicts (`{"state_dict": ...}`, `{"model": ...}`, ...), DataParallel/DDP's
`module.` prefix, and the wrapper modules `torch.compile` (`_orig_mod`), FSDP
and activation checkpointing put into key paths, in any order
(`module._orig_mod.conv1.weight`); the same for a wrapped module
(`torch.compile(m)`, `nn.DataParallel(m)`). A checkpoint whose weights are
under another key is refused with its keys named.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxprune.errors import UserError
from models.net import Net
from models.registry import create, detect, match

# torch keeps a step counter in every BatchNorm; it carries no information here.
_DROPPED_SUFFIXES = ("num_batches_tracked",)
# Keys under which training scripts save the model's state dict inside a checkpoint, in the
# order they are looked for.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")
# Module names wrappers put inside key paths: torch.compile, FSDP, activation checkpointing.
_WRAPPER_MODULES = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
# The prefix DataParallel / DDP give every key ("module" is a common name elsewhere: only
# taken when every key has it).
_PARALLEL_PREFIX = "module."
# A module's attribute holding the module it wraps: torch.compile, DataParallel / DDP.
_WRAPPED_MODULE_ATTRS = ("_orig_mod", "module")


def _to_numpy(state: dict) -> dict[str, np.ndarray]:
    """Tensors (or arrays) as NumPy arrays; every floating dtype as float32 (numpy has no
    bfloat16, and jaxprune computes in float32)."""
    out = {}
    for k, v in state.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            v = v.float() if v.is_floating_point() else v
            v = v.numpy()
        v = np.asarray(v)
        if v.dtype.kind == "f" or v.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            v = v.astype(np.float32)
        out[k] = v
    return out


def _strip_wrappers(state: dict) -> dict:
    """Keys without what wrapper modules add (see the module doc), e.g.
    `module._orig_mod.layer1.0.conv1.weight` -> `layer1.0.conv1.weight`."""
    def plain(k: str) -> str:
        return ".".join(part for part in k.split(".") if part not in _WRAPPER_MODULES)
    state = {plain(k): v for k, v in state.items()}
    while state and all(k.startswith(_PARALLEL_PREFIX) for k in state):
        state = {k[len(_PARALLEL_PREFIX):]: v for k, v in state.items()}
    return state


def _is_tensor(v) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


def _unwrap(obj: Any, source: str) -> dict:
    """The state dict inside `obj`, unwrapped (see the module doc), or a UserError that
    names what `obj` holds."""
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                return _unwrap(obj[key], source)
        if obj and all(isinstance(k, str) for k in obj):
            tensors = {k: v for k, v in obj.items() if _is_tensor(v)}
            if tensors:  # a state dict (entries that are not tensors carry no weights)
                return _strip_wrappers(tensors)
            inner = [k for k, v in obj.items() if isinstance(v, dict)]
            raise UserError(f"{source}: a checkpoint with keys {sorted(obj)[:8]} and no state "
                            f"dict under the keys looked for ({', '.join(_WRAPPER_KEYS)})"
                            + (f"; pass the one that holds the weights, e.g. "
                               f"checkpoint[{inner[0]!r}]" if inner else ""))
    raise UserError(f"{source}: expected a state dict (a mapping of parameter names to "
                    f"tensors), got {type(obj).__name__}")


def _unwrap_module(module):
    """The module inside `torch.compile` / DataParallel / DDP wrappers."""
    import torch
    while True:
        inner = next((getattr(module, a) for a in _WRAPPED_MODULE_ATTRS
                      if isinstance(getattr(module, a, None), torch.nn.Module)), None)
        if inner is None:
            return module
        module = inner


def _file_kind(path: Path) -> str:
    """What a weights file is, from its first bytes and, for a zip archive, its members:
    'torch' (torch.save, zip or legacy pickle/tar), 'safetensors', 'torchscript',
    'torch.export', 'truncated-zip', 'zip' (another zip), 'empty' or 'unknown'."""
    with path.open("rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "truncated-zip"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("/archive_format") for n in names):
            return "torch.export"
        return "torch" if any(n.endswith("data.pkl") for n in names) else "zip"
    if head[:1] == b"\x80" or head[257:262] == b"ustar":  # pickle protocol >= 2, tar
        return "torch"
    if len(head) > 8 and head[8:9] == b"{":  # safetensors: u64 header length, JSON header
        return "safetensors"
    return "unknown"


def _torch_load(path: Path):
    import pickle
    import re
    import warnings

    import torch
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol": the error says it
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "truncated" in str(e) or "ran out of input" in str(e).lower():
            raise UserError(f"{path} is not a readable torch file (its pickle ends early); it "
                            "may be truncated: re-download or re-save it") from None
        # torch's own text advises weights_only=False, the opposite of what to do here
        wanted = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f" (it asks for {wanted.group(1)})" if wanted else ""
        raise UserError(f"{path} holds Python objects besides tensors{what} and was refused "
                        "without being run; save a plain state dict "
                        "(torch.save(model.state_dict(), ...)) or safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable torch file ({reason}); "
                        "it may be truncated: re-download or re-save it") from None


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file  # torch's dtypes: bfloat16 and float8 too
    try:
        return _to_numpy(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); "
                        "it may be truncated: re-download or re-export it") from None


def read_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict | None]:
    """(state dict as NumPy arrays, arch.json contents or None) from a file or export folder.
    The file's type comes from its content (see the module doc); a UserError names what
    the file is when it holds no state dict jaxprune can read."""
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
    kind = _file_kind(path)
    if kind == "safetensors":
        return _read_safetensors(path), arch
    if kind == "torch":
        return _to_numpy(_unwrap(_torch_load(path), str(path))), arch
    refusals = {
        "torchscript": "is a TorchScript archive (torch.jit.save): it holds a program, not a "
                       "state dict; save its weights with "
                       f"torch.save(torch.jit.load({str(path)!r}).state_dict(), 'weights.pth') "
                       "and give that file",
        "torch.export": "is a torch.export program (torch.export.save); save its weights with "
                        f"torch.save(torch.export.load({str(path)!r}).state_dict, "
                        "'weights.pth') and give that file (a jaxprune export: give its folder)",
        "truncated-zip": "is not a readable torch file (a zip archive without its directory, "
                         "which is written last); it may be truncated: re-download or re-save it",
        "zip": "is a zip archive but not a torch file (no data.pkl in it); give a file written "
               "by torch.save or safetensors",
        "empty": "is empty; re-download or re-save it",
        "unknown": "is neither a torch file (torch.save: zip or pickle) nor safetensors; give "
                   "a file written by torch.save(model.state_dict(), ...) or safetensors",
    }
    raise UserError(f"{path} {refusals[kind]}")


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
        module = _unwrap_module(obj)
        source = type(module).__name__
        state = _to_numpy(module.state_dict())
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
