"""What each linear layer contributes to a fused layer, by its linear kind.

Each layer kind declares its linear kind (`models.layers.Layer.linear_kind`):
"conv", "linear", "channelwise", "add", "identity", or None (a boundary).
Merging always uses inference semantics: a channelwise layer (BatchNorm, with
its running statistics) is its per-channel scale, folded into the neighbouring
conv, and its shift reaches the fused bias through `f(0)`; dropout and
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
        return m.channelwise(layer.channel_affine()[0] if weights else None)
    if kind == "linear":
        w = np.asarray(layer.kernel.value, np.float64) if weights else None
        if isinstance(m, DenseMap):
            return m.linear(w, layer.dout)
        # a Linear on an NHWC map inside a conv run is a 1x1 conv
        return m.conv(None if w is None else w[None, None], (1, 1), (1, 1), ((0, 0), (0, 0)),
                      1, layer.dout, layer.bias is not None)
    if kind == "conv":
        if not isinstance(m, SpatialMap):
            raise TypeError("a conv in a run without spatial axes")
        w = np.asarray(layer.kernel.value, np.float64) if weights else None
        return m.conv(w, layer.kernel_size, layer.stride, layer.padding, layer.groups, layer.cout,
                      layer.bias is not None)
    raise ValueError(f"not a linear kind: {kind}")


def _np_conv(x: np.ndarray, w: np.ndarray, stride, padding, groups: int) -> np.ndarray:
    """A conv of one (H, W, C) image in float64: a sum over taps of strided slices."""
    (plo, phi), (qlo, qhi) = padding
    x = np.pad(x, ((max(plo, 0), max(phi, 0)), (max(qlo, 0), max(qhi, 0)), (0, 0)))
    x = x[max(-plo, 0):x.shape[0] - max(-phi, 0), max(-qlo, 0):x.shape[1] - max(-qhi, 0)]
    (kh, kw, ci, cout), (sh, sw) = w.shape, stride
    ho, wo = (x.shape[0] - kh) // sh + 1, (x.shape[1] - kw) // sw + 1
    out = np.zeros((ho, wo, cout))
    for b in range(kh):
        for d in range(kw):
            xs = x[b:b + sh * (ho - 1) + 1:sh, d:d + sw * (wo - 1) + 1:sw]
            if groups == 1:
                out += xs @ w[b, d]
            else:
                out += np.einsum("hwgi,igo->hwgo", xs.reshape(ho, wo, groups, ci),
                                 w[b, d].reshape(ci, groups, cout // groups)).reshape(ho, wo, cout)
    return out


def apply_numpy(kind: str, layer, xs: list[np.ndarray]) -> np.ndarray:
    """The layer in eval mode on float64 arrays without the batch axis (exact reference
    for a fused layer's bias: the run applied to zeros)."""
    if kind == "identity":
        return xs[0]
    if kind == "add":
        return sum(xs[1:], xs[0])
    if kind == "channelwise":
        scale, shift = layer.channel_affine()
        return xs[0] * scale + shift
    bias = 0.0 if layer.bias is None else np.asarray(layer.bias.value, np.float64)
    w = np.asarray(layer.kernel.value, np.float64)
    if kind == "linear":
        return xs[0] @ w + bias
    return _np_conv(xs[0], w, layer.stride, layer.padding, layer.groups) + bias


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
