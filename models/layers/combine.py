"""Layers that combine several inputs: `Add` (residual sums), `Mul` (gating) and
`Concat` (channel concatenation)."""
from __future__ import annotations

import jax.numpy as jnp

from models.layers.base import Layer


class Add(Layer):
    """Sum of its inputs (residual connections)."""
    torch_counterpart = "Add"

    def __call__(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out

    def config(self):
        return {}

    def macs(self, in_shapes, out_shape):
        return 0  # elementwise work

    def linear_kind(self):
        return "add"


class Mul(Layer):
    """Elementwise product of two inputs, broadcasting as NumPy does: a squeeze-excitation
    gate (N, 1, 1, C) times its feature map (N, H, W, C). Not linear in the pair."""
    torch_counterpart = "Mul"

    def __call__(self, a, b):
        return a * b

    def config(self):
        return {}

    def macs(self, in_shapes, out_shape):
        return 0  # elementwise work

    def linear_kind(self):
        return None


class Concat(Layer):
    """Concatenation along the channel (last) axis: torch's `cat(dim=1)` of NCHW maps
    (DenseNet's feature reuse, Inception-style branches)."""
    torch_counterpart = "Concat"

    def __call__(self, *xs):
        return jnp.concatenate(xs, axis=-1)

    def config(self):
        return {}

    def macs(self, in_shapes, out_shape):
        return 0  # a copy

    def linear_kind(self):
        return None  # merging composes single-input runs; a concat joins several
