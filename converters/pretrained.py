"""`model.pretrained`: start a model from torch weights (a file, or torchvision's hub).

A pretrained ImageNet model usually has another class count than the task:
every weight is loaded except the final classifier layer, which keeps its
fresh initialisation when (and only when) its shape differs.
"""
from __future__ import annotations

import numpy as np

from jaxprune.config import TORCHVISION
from jaxprune.errors import UserError
from models.net import Net

from converters.torch_in import load_state, read_file, torch_state_dict

# jaxprune arch -> torchvision builder whose weights enum it takes
TORCHVISION_BUILDERS = {
    "resnet18": "resnet18", "resnet34": "resnet34", "vgg16_bn": "vgg16_bn",
    "mobilenet_v2": "mobilenet_v2", "swin_t": "swin_t",
}


def _torchvision_builder(arch: str) -> str | None:
    """The torchvision builder whose weights `arch` takes: a built-in model's, or the
    factory a traced model was made by (`torch:torchvision.models:resnet50`)."""
    module, _, factory = arch.removeprefix("torch:").partition(":")
    if arch.startswith("torch:") and module.split(".")[0] == "torchvision" and factory:
        return factory
    return TORCHVISION_BUILDERS.get(arch)


def torchvision_state(ref: str, arch: str) -> dict[str, np.ndarray]:
    """torchvision's weights `ref` (a weights enum name) of `arch`, downloaded by torchvision."""
    from jaxprune.torch_compat import torchvision
    tv = torchvision()
    builder = _torchvision_builder(arch)
    if builder is None:
        raise UserError(f"model.pretrained: torchvision has no weights for {arch!r}; "
                        f"use a .pth/.safetensors path (torchvision weights exist for "
                        f"{sorted(TORCHVISION_BUILDERS)} and torch:torchvision.models:<name>)")
    try:
        weights = tv.models.get_model_weights(builder)[ref]
    except KeyError:
        names = [w.name for w in tv.models.get_model_weights(builder)]
        raise UserError(f"model.pretrained: torchvision has no weights {ref!r} for {builder}; "
                        f"available: {names}") from None
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # no network: URLError, socket errors, HTTP errors
        raise UserError(f"model.pretrained: could not download torchvision:{ref} ({e}); "
                        f"this machine may have no internet: download {weights.url} elsewhere "
                        f"and set model.pretrained to the file's path") from None
    return {k: v.numpy() for k, v in state.items()}


def load_pretrained(m: Net, ref: str) -> Net:
    """Load `ref` (`path` or `torchvision:<WEIGHTS>`) into `m`, keeping a resized head fresh."""
    if ref.startswith(TORCHVISION):
        state = torchvision_state(ref[len(TORCHVISION):], m.spec.arch)
        source = ref
    else:
        state, _ = read_file(ref)
        source = ref
    own = torch_state_dict(m)
    head = [n for n, layer in m.named_layers() if layer.torch_state()][-1]
    for key in [k for k in own if k.startswith(head + ".")]:
        if key in state and state[key].shape != own[key].shape:
            # A different class count: keep the freshly initialised classifier.
            state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
            state.update({k: v for k, v in own.items() if k.startswith(head + ".")})
            break
    return load_state(m, state, source)
