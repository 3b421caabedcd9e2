"""`Act`: an activation site, the unit every depth-reduction method works on."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers.base import Layer, Mask

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,                # x * sigmoid(x)
    "hardswish": jax.nn.hard_swish,     # x * relu6(x + 3) / 6, as torch
    "hardsigmoid": jax.nn.hard_sigmoid,  # relu6(x + 3) / 6, as torch
    "sigmoid": jax.nn.sigmoid,
}
# Activations that make a gate: a factor in [0, 1] that scales another tensor
# (squeeze-excitation). Their sites are sites like any other, but merging never
# treats them as identities: the gated product is nonlinear in the block input
# whatever the gate's mask, so nothing downstream of a gate fuses with the branch
# that feeds it, and keeping the gate keeps its site (and mask) in the merged model.
GATES = frozenset({"sigmoid", "hardsigmoid"})


class Act(Layer):
    """An activation site: `y = x + mask * (act(x) - x)`.

    mask 1 = the nonlinearity, 0 = identity; any shape broadcastable to x
    (scalar by default; per channel or per pixel for SNL). The mask is state,
    so a jitted function sees a new mask without recompiling.
    With `record=True` the site sows `on_frac`: the per-channel fraction of
    pre-activations `>= 0`, averaged over every axis but the last.
    Merging treats a site as an identity only while its mask is 0 everywhere, and
    a gate (`GATES`) never.
    """
    torch_counterpart = "Act"

    def __init__(self, kind: str):
        if kind not in ACTIVATIONS:
            raise ValueError(f"unknown activation {kind!r}; expected one of {sorted(ACTIVATIONS)}")
        self.kind = kind
        self.mask = Mask(jnp.ones((), jnp.float32))
        self.record = False

    def __call__(self, x):
        if self.record:
            on = (x >= 0).astype(jnp.float32)
            self.sow(nnx.Intermediate, "on_frac", jnp.mean(on, axis=tuple(range(x.ndim - 1))))
        f = ACTIVATIONS[self.kind](x)
        return x + self.mask.value * (f - x)

    def config(self):
        return dict(kind=self.kind)

    def macs(self, in_shapes, out_shape):
        return 0  # elementwise work

    def linear_kind(self):
        if self.kind in GATES or np.any(np.asarray(self.mask.value) != 0):
            return None
        return "identity"
