"""torch's weight initialisations, so fresh jaxprune models start where torch models do.

Each initializer is called as `init(key, shape, dtype)` with the layer's JAX key
(`rngs.params()`), and draws on the host with NumPy: an eager `jax.random` draw
compiles one XLA program per shape, about a quarter of a second each on a CPU
(13 s for the first ResNet-18 of a process); NumPy draws in microseconds. The
stream is NumPy's PCG64 (float32 draws) seeded with the key's bits, so a seed gives the same
weights on every platform and in every process. Under a trace (`nnx.eval_shape`,
`jax.jit`) the key has no value: the draw is then a host callback, which
`eval_shape` never runs.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Sample = Callable[[np.random.Generator, tuple], np.ndarray]


def _host_draw(key_bits, shape: tuple, dtype, sample: Sample) -> np.ndarray:
    rng = np.random.default_rng([int(b) for b in np.asarray(key_bits, np.uint32).ravel()])
    return np.asarray(sample(rng, shape), dtype)


def _initializer(sample: Sample):
    """`init(key, shape, dtype)` drawing `sample(rng, shape)` with a NumPy generator seeded by
    `key` (see the module doc)."""
    def init(key, shape, dtype=jnp.float32):
        shape = tuple(shape)
        bits = jax.random.key_data(key)
        if isinstance(bits, jax.core.Tracer):
            return jax.pure_callback(lambda b: _host_draw(b, shape, dtype, sample),
                                     jax.ShapeDtypeStruct(shape, dtype), bits)
        # device_put, not jnp.asarray: asarray stages the value through a program per shape
        return jax.device_put(_host_draw(bits, shape, dtype, sample))
    return init


def _scaled_normal(rng: np.random.Generator, shape: tuple, std: float) -> np.ndarray:
    x = rng.standard_normal(shape, np.float32)
    x *= std  # in place: VGG's classifier alone is 120 M draws
    return x


def uniform(bound: float):
    """U(-bound, bound): torch's default for nn.Linear and nn.Conv2d (bound 1/sqrt(fan_in))."""
    def sample(rng, shape):
        x = rng.random(shape, np.float32)
        x *= 2 * bound
        x -= bound
        return x
    return _initializer(sample)


def normal(std: float):
    """N(0, std²): torchvision's init of VGG's and MobileNetV2's classifiers (std 0.01)."""
    return _initializer(lambda rng, shape: _scaled_normal(rng, shape, std))


def kaiming_normal_fan_out():
    """torch's `kaiming_normal_(mode="fan_out", nonlinearity="relu")` for an HWIO kernel:
    N(0, 2 / fan_out), fan_out = kh * kw * out channels (torchvision's conv init)."""
    def sample(rng, shape):
        return _scaled_normal(rng, shape, math.sqrt(2.0 / (math.prod(shape[:-2]) * shape[-1])))
    return _initializer(sample)


def trunc_normal(std: float):
    """torch's `trunc_normal_(std=std)`: cut at +-2 absolute (not +-2 std), no rescaling;
    the draws outside are drawn again."""
    def sample(rng, shape):
        x = _scaled_normal(rng, shape, std)
        while (out := np.abs(x) > 2.0).any():
            x[out] = std * rng.standard_normal(int(out.sum()), np.float32)
        return x
    return _initializer(sample)


def zeros(key, shape, dtype=jnp.float32):
    """All zeros (torch's bias init where a model asks for it)."""
    del key
    return jax.device_put(np.zeros(shape, dtype))
