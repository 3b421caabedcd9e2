"""`arch.json`: a model's graph as data, so an export can be rebuilt without its builder.

A fused model (or one a method edited, e.g. DepthShrinker's added ReLU6) cannot
come back from `models.create`; its export therefore describes every layer:
type, constructor arguments, inputs, plus the spec and the activation masks.
`net_from_arch` rebuilds the `Net` (fresh weights; `converters.from_torch`
then loads `model.safetensors` into it).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError
from jaxprune.merging.layers import FusedConv
from models import layers as L
from models import swin as S
from models.net import ModelSpec, Net

FORMAT = "jaxprune-export"
VERSION = 1

# type name -> (class, constructor arguments of a layer, whether the constructor takes rngs)
_LAYERS = {
    "Conv": (L.Conv, lambda l: dict(cin=l.cin, cout=l.cout, kernel=list(l.kernel_size),
                                    stride=list(l.stride), padding=[list(p) for p in l.padding],
                                    groups=l.groups, bias=l.bias is not None), True),
    "BatchNorm": (L.BatchNorm, lambda l: dict(num_features=l.num_features, epsilon=l.epsilon,
                                              momentum=l.momentum), False),
    "Act": (L.Act, lambda l: dict(kind=l.kind), False),
    "Linear": (L.Linear, lambda l: dict(din=l.din, dout=l.dout, bias=l.bias is not None), True),
    "LayerNorm": (L.LayerNorm, lambda l: dict(dim=l.dim, epsilon=l.epsilon), False),
    "Add": (L.Add, lambda l: {}, False),
    "MaxPool": (L.MaxPool, lambda l: dict(kernel=l.kernel, stride=l.stride, padding=l.padding), False),
    "GlobalAvgPool": (L.GlobalAvgPool, lambda l: {}, False),
    "AdaptiveAvgPool": (L.AdaptiveAvgPool, lambda l: dict(out_hw=list(l.out_hw)), False),
    "FlattenNCHW": (L.FlattenNCHW, lambda l: {}, False),
    "Dropout": (L.Dropout, lambda l: dict(rate=l.rate), True),
    "ShiftedWindowAttention": (S.ShiftedWindowAttention, lambda l: dict(
        dim=l.dim, num_heads=l.num_heads, window=l.window, shift=l.shift), True),
    "PatchMerging": (S.PatchMerging, lambda l: {}, False),
    "StochasticDepth": (S.StochasticDepth, lambda l: dict(p=l.p), True),
    "FusedConv": (FusedConv, lambda l: l.config(), False),
}
_BY_CLASS = {cls: name for name, (cls, _, _) in _LAYERS.items()}


def _mask_value(mask: np.ndarray):
    return float(mask) if mask.ndim == 0 else mask.tolist()


def arch_dict(m: Net) -> dict:
    """Everything but the weights: spec, graph (layer types and arguments), masks."""
    graph, masks = [], {}
    for name, inputs in m.graph:
        layer = m.layers[name]
        kind = _BY_CLASS.get(type(layer))
        if kind is None:
            raise UserError(f"export: layer {name!r} is a {type(layer).__name__}, which arch.json "
                            f"cannot describe (known: {sorted(_LAYERS)})")
        graph.append({"name": name, "inputs": list(inputs), "type": kind,
                      "config": _LAYERS[kind][1](layer)})
        if isinstance(layer, L.Act):
            mask = np.asarray(layer.mask.value)
            if not (mask.ndim == 0 and float(mask) == 1.0):
                masks[name] = _mask_value(mask)
    return {"format": FORMAT, "version": VERSION, **m.spec.as_dict(), "graph": graph,
            "masks": masks}


def net_from_arch(spec: dict, source: str = "arch.json") -> Net:
    """The `Net` an `arch_dict` describes, with fresh weights and its masks set."""
    if spec.get("format") != FORMAT or "graph" not in spec:
        raise UserError(f"{source}: not a jaxprune export description (no graph); re-export "
                        f"the model with converters.export")
    if spec.get("version", 0) > VERSION:
        raise UserError(f"{source}: export format version {spec['version']} is newer than this "
                        f"jaxprune reads ({VERSION}); update jaxprune")
    layers, graph = {}, []
    rngs = nnx.Rngs(0)
    for entry in spec["graph"]:
        kind = entry["type"]
        if kind not in _LAYERS:
            raise UserError(f"{source}: unknown layer type {kind!r} for {entry['name']!r}")
        cls, _, takes_rngs = _LAYERS[kind]
        config = dict(entry["config"])
        layers[entry["name"]] = cls(**config, rngs=rngs) if takes_rngs else cls(**config)
        graph.append((entry["name"], tuple(entry["inputs"])))
    for site, value in spec.get("masks", {}).items():
        layers[site].mask.value = jnp.asarray(value, jnp.float32)
    model_spec = ModelSpec(spec["arch"], spec["num_classes"],
                           tuple(sorted(spec.get("options", {}).items())),
                           tuple(spec["input_size"]), spec.get("in_channels", 3))
    return Net(layers, tuple(graph), model_spec)
