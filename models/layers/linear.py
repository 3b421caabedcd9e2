"""`Linear`, a dense layer over the last axis, and `Scale`, a learned per-channel factor."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers.base import Layer, set_from_torch
from models.layers.initializers import uniform


class Linear(Layer):
    """Dense layer over the last axis; kernel (in, out), torch weight (out, in)."""
    torch_counterpart = "Linear"

    def __init__(self, din: int, dout: int, *, bias: bool = True, rngs: nnx.Rngs,
                 kernel_init=None, bias_init=None):
        self.din, self.dout = din, dout
        bound = 1.0 / math.sqrt(din)  # torch's nn.Linear default for both
        kinit = kernel_init or uniform(bound)
        binit = bias_init or uniform(bound)
        self.kernel = nnx.Param(kinit(rngs.params(), (din, dout), jnp.float32))
        self.bias = nnx.Param(binit(rngs.params(), (dout,), jnp.float32)) if bias else None

    def __call__(self, x):
        y = x @ self.kernel.value
        return y + self.bias.value if self.bias is not None else y

    def config(self):
        return dict(din=self.din, dout=self.dout, bias=self.bias is not None)

    def macs(self, in_shapes, out_shape):
        return math.prod(out_shape[1:]) * self.din

    def linear_kind(self):
        return "linear"

    def weight_layers(self):
        return 1

    def torch_state(self):
        out = {"weight": np.asarray(self.kernel.value).T}
        if self.bias is not None:
            out["bias"] = np.asarray(self.bias.value)
        return out

    def load_torch_state(self, state, name):
        set_from_torch(self.kernel, state["weight"], f"{name}.weight", (self.dout, self.din),
                       lambda w: w.T)
        if self.bias is not None:
            set_from_torch(self.bias, state["bias"], f"{name}.bias", (self.dout,), lambda b: b)


class Scale(Layer):
    """`x * gamma` with one learned factor per channel (last axis): ConvNeXt's layer scale.

    The torch model keeps `gamma` as the parameter `param` of the module this layer is
    named after (`features.1.0.layer_scale`), in the shape `torch_shape` that broadcasts
    it over its maps ((C, 1, 1) for NCHW, (C,) for channels-last); jaxprune stores (C,).
    Merging folds it like BatchNorm: a per-channel scale with no shift.
    """
    torch_counterpart = "Scale"

    def __init__(self, dim: int, *, param: str = "weight", torch_shape=None):
        self.dim, self.param = dim, param
        self.torch_shape = tuple(torch_shape) if torch_shape is not None else (dim,)
        if math.prod(self.torch_shape) != dim:
            raise ValueError(f"torch_shape {self.torch_shape} does not hold {dim} channels")
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x):
        return x * self.scale.value

    def config(self):
        return dict(dim=self.dim, param=self.param, torch_shape=list(self.torch_shape))

    def macs(self, in_shapes, out_shape):
        return 0  # elementwise work

    def linear_kind(self):
        return "channelwise"

    def channel_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """`x * scale + shift` per channel, float64 (see `BatchNorm.channel_affine`)."""
        return np.asarray(self.scale.value, np.float64), np.zeros((self.dim,))

    def torch_state(self):
        return {self.param: np.asarray(self.scale.value).reshape(self.torch_shape)}

    def load_torch_state(self, state, name):
        set_from_torch(self.scale, state[self.param], f"{name}.{self.param}", self.torch_shape,
                       lambda v: v.reshape(-1))
