"""Training-time noise that is the identity in eval mode: `Dropout`, `StochasticDepth`.
Merging, which works in eval mode, treats both as identities."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune.errors import UserError
from models.layers.base import Layer


class _EvalIdentity(Layer):
    """Shared declarations of layers that are identities in eval mode."""
    torch_counterpart = "Identity"

    def macs(self, in_shapes, out_shape):
        return 0

    def linear_kind(self):
        return "identity"


class Dropout(_EvalIdentity):
    """Dropout; identity in eval mode (`deterministic=True`, set by `model.eval()`)."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.rate = rate
        self.deterministic = False
        self.rngs = rngs.fork()

    def __call__(self, x):
        if self.deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        m = jax.random.bernoulli(self.rngs.dropout(), keep, x.shape)
        return jnp.where(m, x / keep, 0.0)

    def config(self):
        return dict(rate=self.rate)


class StochasticDepth(_EvalIdentity):
    """torchvision's `StochasticDepth(p, "row")`: drops a residual branch per sample.

    Train mode: each sample's input is zeroed with probability p, kept and
    scaled by 1/(1-p) otherwise. Identity in eval mode (`deterministic=True`,
    set by `model.eval()`) and when p == 0.
    """

    def __init__(self, p: float, *, rngs: nnx.Rngs):
        if not 0.0 <= p <= 1.0:
            raise UserError(f"stochastic depth probability must be in [0, 1], got {p}")
        self.p = p
        self.deterministic = False
        self.rngs = rngs.fork()

    def __call__(self, x):
        if self.deterministic or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        if keep == 0.0:
            return jnp.zeros_like(x)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        noise = jax.random.bernoulli(self.rngs.dropout(), keep, shape).astype(x.dtype)
        return x * (noise / keep)

    def config(self):
        return dict(p=self.p)
