"""Normalizations with torch semantics: `BatchNorm` and `LayerNorm` over the last axis."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers.base import Layer, set_from_torch


class BatchNorm(Layer):
    """BatchNorm over the last axis with torch semantics.

    Train mode normalizes with the (global, when sharded) batch statistics and
    updates running statistics with momentum 0.9 and torch's unbiased variance;
    eval mode (`use_running_average=True`, set by `model.eval()`) uses them.
    Merging folds it as the per-channel affine map of eval mode.
    """
    torch_counterpart = "BatchNorm"

    def __init__(self, num_features: int, *, epsilon: float = 1e-5, momentum: float = 0.9,
                 rngs: nnx.Rngs | None = None):
        del rngs
        self.num_features = num_features
        self.epsilon, self.momentum = epsilon, momentum
        self.use_running_average = False
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x):
        if self.use_running_average:
            mean, var = self.mean.value, self.var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)  # exact two-pass variance
            n = math.prod(x.shape[:-1])
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.mean.value = m * self.mean.value + (1 - m) * jax.lax.stop_gradient(mean)
            self.var.value = m * self.var.value + (1 - m) * jax.lax.stop_gradient(unbiased)
        inv = jax.lax.rsqrt(var + self.epsilon) * self.scale.value
        return (x - mean) * inv + self.bias.value

    def config(self):
        return dict(num_features=self.num_features, epsilon=self.epsilon, momentum=self.momentum)

    def macs(self, in_shapes, out_shape):
        return 0  # elementwise work, not multiply-accumulates

    def linear_kind(self):
        return "channelwise"

    def channel_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Eval mode as `x * scale + shift` per channel, in float64:
        scale = γ / sqrt(var + ε), shift = β − mean · scale (DESIGN.md §7)."""
        var = np.asarray(self.var.value, np.float64)
        scale = np.asarray(self.scale.value, np.float64) / np.sqrt(var + self.epsilon)
        shift = np.asarray(self.bias.value, np.float64) - np.asarray(self.mean.value, np.float64) * scale
        return scale, shift

    def torch_state(self):
        return {"weight": np.asarray(self.scale.value), "bias": np.asarray(self.bias.value),
                "running_mean": np.asarray(self.mean.value),
                "running_var": np.asarray(self.var.value)}

    def load_torch_state(self, state, name):
        c = (self.num_features,)
        for suffix, var in (("weight", self.scale), ("bias", self.bias),
                            ("running_mean", self.mean), ("running_var", self.var)):
            set_from_torch(var, state[suffix], f"{name}.{suffix}", c, lambda v: v)


class LayerNorm(Layer):
    """LayerNorm over the last axis, torch semantics (biased variance, eps 1e-5)."""
    torch_counterpart = "LayerNorm"

    def __init__(self, dim: int, *, epsilon: float = 1e-5, rngs: nnx.Rngs | None = None):
        del rngs
        self.dim, self.epsilon = dim, epsilon
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale.value + self.bias.value

    def config(self):
        return dict(dim=self.dim, epsilon=self.epsilon)

    def macs(self, in_shapes, out_shape):
        return 0  # elementwise work

    def linear_kind(self):
        return None  # normalizes by the input's own statistics: not linear

    def torch_state(self):
        return {"weight": np.asarray(self.scale.value), "bias": np.asarray(self.bias.value)}

    def load_torch_state(self, state, name):
        for suffix, var in (("weight", self.scale), ("bias", self.bias)):
            set_from_torch(var, state[suffix], f"{name}.{suffix}", (self.dim,), lambda v: v)
