"""Which layers are linear at merge time, and what each contributes to a fused layer.

Merging always uses inference semantics: BatchNorm with its running
statistics (`scale = gamma / sqrt(var + eps)`, folded into the neighbouring
conv; its shift reaches the fused bias through `f(0)`), dropout and
stochastic depth as identities, an activation site as an identity only when
its mask is exactly 0 everywhere (a partially masked SNL site stays
nonlinear).
"""
from __future__ import annotations

import contextlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import Act, Add, BatchNorm, Conv, Dropout, Linear
from models.net import Net
from models.swin import StochasticDepth

from jaxprune.merging.affine import DenseMap, SpatialMap

# Layers that are identities in eval mode.
_EVAL_IDENTITY = (Dropout, StochasticDepth)
# Attributes that switch layers between train and eval behaviour.
_MODE_FLAGS = ("use_running_average", "deterministic", "record")


def op_kind(layer) -> str | None:
    """'conv', 'linear', 'channelwise', 'add', 'identity', or None (a boundary)."""
    if type(layer) is Conv:
        return "conv"
    if type(layer) is Linear:
        return "linear"
    if type(layer) is BatchNorm:
        return "channelwise"
    if type(layer) is Add:
        return "add"
    if isinstance(layer, _EVAL_IDENTITY):
        return "identity"
    if isinstance(layer, Act) and not bool(jnp.any(layer.mask.value != 0)):
        return "identity"
    return None


def bn_scale(bn: BatchNorm) -> np.ndarray:
    """The per-channel factor of an eval-mode BatchNorm, in float64."""
    var = np.asarray(bn.var.value, np.float64)
    return np.asarray(bn.scale.value, np.float64) / np.sqrt(var + bn.epsilon)


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
        return m.channelwise(bn_scale(layer) if weights else None)
    if kind == "linear":
        w = np.asarray(layer.kernel.value, np.float64) if weights else None
        if isinstance(m, DenseMap):
            return m.linear(w, layer.dout)
        # a Linear on an NHWC map inside a conv run is a 1x1 conv
        return m.conv(None if w is None else w[None, None], (1, 1), (1, 1), ((0, 0), (0, 0)),
                      1, layer.dout)
    if kind == "conv":
        if not isinstance(m, SpatialMap):
            raise TypeError("a conv in a run without spatial axes")
        w = np.asarray(layer.kernel.value, np.float64) if weights else None
        return m.conv(w, layer.kernel_size, layer.stride, layer.padding, layer.groups, layer.cout)
    raise ValueError(f"not a linear kind: {kind}")


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
