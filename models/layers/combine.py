"""`Add`: the sum of its inputs (residual connections)."""
from __future__ import annotations

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
