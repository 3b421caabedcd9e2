"""torch's weight initialisations, so fresh jaxprune models start where torch models do."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def uniform(bound: float):
    """U(-bound, bound): torch's default for nn.Linear and nn.Conv2d (bound 1/sqrt(fan_in))."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def trunc_normal(std: float):
    """torch's `trunc_normal_(std=std)`: cut at +-2 absolute (not +-2 std), no rescaling."""
    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)
    return init
