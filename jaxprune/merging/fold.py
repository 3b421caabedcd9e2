"""What each linear layer contributes to a fused layer, by its linear kind.

Each layer kind declares its linear kind (`models.layers.Layer.linear_kind`):
"conv", "linear", "channelwise", "add", "identity", or None (a boundary).
Merging always uses inference semantics: a channelwise layer (BatchNorm, with
its running statistics) is its per-channel scale, folded into the neighbouring
conv, and its shift is composed into the fused bias; dropout and
stochastic depth are identities; an activation site is an identity only while
its mask is exactly 0 everywhere (a partially masked SNL site stays nonlinear).
"""
from __future__ import annotations

import contextlib

import numpy as np
from flax import nnx

from models.net import Net

from jaxprune.merging.affine import DenseMap, SpatialMap

# Attributes that switch layers between train and eval behaviour.
_MODE_FLAGS = ("use_running_average", "deterministic", "record")


def _values(param, weights: bool):
    """A layer's parameter in float64 (None in geometry mode or when it has none)."""
    return None if param is None or not weights else np.asarray(param.value, np.float64)


def compose(kind: str, layer, maps: list, weights: bool):
    """The map after `layer` given the maps of its inputs (SpatialMap or DenseMap)."""
    m = maps[0]
    if kind == "identity":
        return m
    if kind == "add":
        for other in maps[1:]:
            m = m.add(other)
        return m
    if kind == "channelwise":
        scale, shift = layer.channel_affine() if weights else (None, None)
        return m.channelwise(scale, shift) if isinstance(m, SpatialMap) else m.channelwise(scale)
    w, bias = _values(layer.kernel, weights), _values(layer.bias, weights)
    if kind == "linear":
        if isinstance(m, DenseMap):
            return m.linear(w, layer.dout)
        # a Linear on an NHWC map inside a conv run is a 1x1 conv
        return m.conv(None if w is None else w[None, None], (1, 1), (1, 1), ((0, 0), (0, 0)),
                      1, layer.dout, layer.bias is not None, bias)
    if kind == "conv":
        if not isinstance(m, SpatialMap):
            raise TypeError("a conv in a run without spatial axes")
        return m.conv(w, layer.kernel_size, layer.stride, layer.padding, layer.groups, layer.cout,
                      layer.bias is not None, bias)
    raise ValueError(f"not a linear kind: {kind}")


def apply_numpy(kind: str, layer, xs: list[np.ndarray]) -> np.ndarray:
    """The layer of a run of Linear / channelwise layers (no convs) in eval mode on float64
    arrays without the batch axis: the fused Linear's bias is the run applied to zeros."""
    if kind == "identity":
        return xs[0]
    if kind == "add":
        return sum(xs[1:], xs[0])
    if kind == "channelwise":
        scale, shift = layer.channel_affine()
        return xs[0] * scale + shift
    bias = 0.0 if layer.bias is None else np.asarray(layer.bias.value, np.float64)
    return xs[0] @ np.asarray(layer.kernel.value, np.float64) + bias


@contextlib.contextmanager
def eval_mode(net: Net):
    """Inference semantics for the duration, restoring every layer's flags afterwards."""
    saved = []
    for _, mod in nnx.iter_modules(net):
        for flag in _MODE_FLAGS:
            if hasattr(mod, flag):
                saved.append((mod, flag, getattr(mod, flag)))
    try:
        for mod, flag, _ in saved:
            setattr(mod, flag, flag != "record")
        yield net
    finally:
        for mod, flag, value in saved:
            setattr(mod, flag, value)
