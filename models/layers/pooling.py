"""Pooling and the reshapes around classifiers: `MaxPool`, `AvgPool`, `GlobalAvgPool`,
`AdaptiveAvgPool`, `FlattenNCHW`. None of them is fused by merging (linear kind None)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from models.layers.base import Layer, windows


class MaxPool(Layer):
    """torch.nn.MaxPool2d (floor mode): padding counts as -inf."""
    torch_counterpart = "MaxPool"

    def __init__(self, kernel: int, stride: int, padding: int = 0):
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def __call__(self, x):
        p, k, s = self.padding, self.kernel, self.stride
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
        out = None
        for view in windows(x, (k, k), (s, s)):
            # Strict '>': the first maximum in row-major order wins and alone gets the
            # gradient, as in torch (jnp.maximum would split ties). On CPU this gradient
            # is ~4x faster than reduce_window's select-and-scatter.
            out = view if out is None else jnp.where(view > out, view, out)
        return out

    def config(self):
        return dict(kernel=self.kernel, stride=self.stride, padding=self.padding)

    def macs(self, in_shapes, out_shape):
        return 0  # comparisons, not multiply-accumulates

    def linear_kind(self):
        return None


class AvgPool(Layer):
    """torch.nn.AvgPool2d (floor mode): zero padding, counted in the divisor unless
    `count_include_pad` is False (then each window divides by its real positions)."""
    torch_counterpart = "AvgPool"

    def __init__(self, kernel: int, stride: int, padding: int = 0, count_include_pad: bool = True):
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.count_include_pad = count_include_pad

    def __call__(self, x):
        p, k, s = self.padding, self.kernel, self.stride
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        total = sum(windows(x, (k, k), (s, s)))
        if self.count_include_pad or p == 0:
            return total / (k * k)
        # real positions under each window: a function of the map size alone
        ones = np.pad(np.ones((1, x.shape[1] - 2 * p, x.shape[2] - 2 * p, 1), np.float32),
                      ((0, 0), (p, p), (p, p), (0, 0)))
        return total / sum(windows(ones, (k, k), (s, s)))

    def config(self):
        return dict(kernel=self.kernel, stride=self.stride, padding=self.padding,
                    count_include_pad=self.count_include_pad)

    def macs(self, in_shapes, out_shape):
        return 0  # additions, not multiply-accumulates

    def linear_kind(self):
        return None


class GlobalAvgPool(Layer):
    """Mean over H and W: (N, H, W, C) -> (N, C)."""
    torch_counterpart = "GlobalAvgPool"

    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2))

    def config(self):
        return {}

    def macs(self, in_shapes, out_shape):
        return 0  # a sum per channel

    def linear_kind(self):
        return None  # linear, but it ends the spatial maps merging composes


def adaptive_bounds(size: int, out: int) -> list[tuple[int, int]]:
    """torch's AdaptiveAvgPool window [start, end) for every output index."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


class AdaptiveAvgPool(Layer):
    """torch.nn.AdaptiveAvgPool2d((oh, ow)): replicates small maps, averages large ones."""
    torch_counterpart = "AdaptiveAvgPool"
    # torch.export specializes the pooling windows to the traced size
    torch_dynamic_size = False

    def __init__(self, out_hw: tuple[int, int]):
        self.out_hw = tuple(out_hw)

    def __call__(self, x):
        h, w = x.shape[1:3]
        oh, ow = self.out_hw
        if (h, w) == (oh, ow):
            return x
        rows = [jnp.mean(x[:, a:b], axis=1) for a, b in adaptive_bounds(h, oh)]
        x = jnp.stack(rows, axis=1)
        cols = [jnp.mean(x[:, :, a:b], axis=2) for a, b in adaptive_bounds(w, ow)]
        return jnp.stack(cols, axis=2)

    def config(self):
        return dict(out_hw=list(self.out_hw))

    def macs(self, in_shapes, out_shape):
        return 0

    def linear_kind(self):
        return None


class FlattenNCHW(Layer):
    """Flatten in torch's NCHW order, so torch classifier weights apply unchanged."""
    torch_counterpart = "FlattenNCHW"

    def __call__(self, x):
        return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)

    def config(self):
        return {}

    def macs(self, in_shapes, out_shape):
        return 0

    def linear_kind(self):
        return None
