"""The layer vocabulary every jaxprune model is built from.

Each layer is an NNX module with one job. Layers that own weights also know
their PyTorch state-dict layout: `torch_state()` returns `{suffix: array}` in
torch layout (OIHW convs, (out, in) linears) and `load_torch_state(state, name)`
takes the same, checking every shape. A model names its layers exactly as the
torch module paths, so converting a whole model is a loop over layers
(`converters.from_torch`).

Layers deliberately avoid `padding='SAME'` and fast variance: both silently
break parity with torch weights (DESIGN.md §4).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError

Pad = tuple[tuple[int, int], tuple[int, int]]


class Mask(nnx.Variable):
    """An activation site's mask: 1 = nonlinear, 0 = identity (state, not a static)."""


def _check_shape(key: str, got: tuple, expected: tuple) -> None:
    if tuple(got) != tuple(expected):
        raise UserError(
            f"shape mismatch for '{key}': the torch weights have {tuple(got)}, "
            f"the model expects {tuple(expected)} (wrong architecture or width?)")


class Layer(nnx.Module):
    """Base of all layers. Layers without torch parameters keep the defaults."""

    def torch_state(self) -> dict[str, np.ndarray]:
        return {}

    def load_torch_state(self, state: dict[str, np.ndarray], name: str) -> None:
        del state, name


def _set(var: nnx.Variable, value: np.ndarray, key: str, expected_torch_shape: tuple, to_jax):
    _check_shape(key, value.shape, expected_torch_shape)
    var.value = jnp.asarray(to_jax(np.asarray(value, dtype=np.float32)))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _sym_pad(p) -> Pad:
    if isinstance(p, int):
        return ((p, p), (p, p))
    return tuple(tuple(q) for q in p)


def _windows(x, kernel: tuple[int, int], stride: tuple[int, int]) -> list:
    """The kh*kw strided views (row-major) of an already padded NHWC map that a
    window of size `kernel` moving by `stride` reads: view (i, j) holds, at every
    output position, the input under the window's tap (i, j)."""
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    return [x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]


def conv_as_matmul(x, kernel, stride: tuple[int, int], padding: Pad, groups: int = 1):
    """`lax.conv_general_dilated` (NHWC, HWIO, explicit padding, groups) as one
    contraction of the kh*kw shifted windows of the padded input.

    XLA's CPU backend leaves its fast convolution path when a convolution's input
    map is smaller than its kernel (ResNet-18's 2x2 stage-4 maps at 32 px: a 3x3
    512->512 conv runs ~50x slower than on a 4x4 map), and the gradient of a
    convolution with a small output is such a convolution. `Conv` uses this form
    for those layers, where the windows are few and the contraction is one GEMM
    per group.
    """
    kh, kw, cin_g, cout = kernel.shape
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    windows = jnp.stack(_windows(x, (kh, kw), stride), axis=3)
    n, oh, ow = windows.shape[:3]
    windows = windows.reshape(n, oh, ow, kh * kw, groups, cin_g)
    k = kernel.reshape(kh * kw, cin_g, groups, cout // groups)
    return jnp.einsum("nhwpgc,pcgo->nhwgo", windows, k).reshape(n, oh, ow, cout)


class Conv(Layer):
    """2-D convolution, NHWC, kernel HWIO, explicit padding, optional groups.

    `bias_map` (optional, (H_out, W_out, C)) is a position-dependent bias used
    by fused layers whose border behaviour differs from the interior.
    """

    def __init__(self, cin: int, cout: int, kernel: int | Sequence[int], *, stride=1, padding=0,
                 groups: int = 1, bias: bool = False, rngs: nnx.Rngs,
                 kernel_init=None):
        kh, kw = _pair(kernel)
        if cin % groups or cout % groups:
            raise ValueError(f"channels {cin}->{cout} not divisible by groups={groups}")
        self.cin, self.cout, self.groups = cin, cout, groups
        self.kernel_size = (kh, kw)
        self.stride = _pair(stride)
        self.padding = _sym_pad(padding)
        # torchvision's default for conv layers: kaiming normal, fan_out, relu gain
        init = kernel_init or jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        self.kernel = nnx.Param(init(rngs.params(), (kh, kw, cin // groups, cout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32)) if bias else None

    def __call__(self, x):
        if self._small_map(x):
            y = conv_as_matmul(x, self.kernel.value, self.stride, self.padding, self.groups)
        else:
            y = jax.lax.conv_general_dilated(
                x, self.kernel.value, self.stride, self.padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
        if self.bias is not None:
            y = y + self.bias.value
        return y

    def _small_map(self, x) -> bool:
        """Input or output map smaller than the kernel (forward or gradient convolutions
        would leave XLA CPU's fast path; see `conv_as_matmul`)."""
        (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = self.kernel_size, self.stride, self.padding
        oh, ow = (x.shape[1] + pt + pb - kh) // sh + 1, (x.shape[2] + pl + pr - kw) // sw + 1
        return min(x.shape[1], oh) < kh or min(x.shape[2], ow) < kw

    def torch_state(self):
        out = {"weight": np.asarray(self.kernel.value).transpose(3, 2, 0, 1)}
        if self.bias is not None:
            out["bias"] = np.asarray(self.bias.value)
        return out

    def load_torch_state(self, state, name):
        kh, kw, ci, co = self.kernel.value.shape
        _set(self.kernel, state["weight"], f"{name}.weight", (co, ci, kh, kw),
             lambda w: w.transpose(2, 3, 1, 0))
        if self.bias is not None:
            _set(self.bias, state["bias"], f"{name}.bias", (co,), lambda b: b)


class BatchNorm(Layer):
    """BatchNorm over the last axis with torch semantics.

    Train mode normalizes with the (global, when sharded) batch statistics and
    updates running statistics with momentum 0.9 and torch's unbiased variance;
    eval mode (`use_running_average=True`, set by `model.eval()`) uses them.
    """

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

    def torch_state(self):
        return {"weight": np.asarray(self.scale.value), "bias": np.asarray(self.bias.value),
                "running_mean": np.asarray(self.mean.value),
                "running_var": np.asarray(self.var.value)}

    def load_torch_state(self, state, name):
        c = (self.num_features,)
        for suffix, var in (("weight", self.scale), ("bias", self.bias),
                            ("running_mean", self.mean), ("running_var", self.var)):
            _set(var, state[suffix], f"{name}.{suffix}", c, lambda v: v)


_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class Act(Layer):
    """An activation site: `y = x + mask * (act(x) - x)`.

    mask 1 = the nonlinearity, 0 = identity; any shape broadcastable to x
    (scalar by default; per channel or per pixel for SNL). The mask is state,
    so a jitted function sees a new mask without recompiling.
    With `record=True` the site sows `on_frac`: the per-channel fraction of
    pre-activations `>= 0`, averaged over every axis but the last.
    """

    def __init__(self, kind: str):
        if kind not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {kind!r}; expected one of {sorted(_ACTIVATIONS)}")
        self.kind = kind
        self.mask = Mask(jnp.ones((), jnp.float32))
        self.record = False

    def __call__(self, x):
        if self.record:
            on = (x >= 0).astype(jnp.float32)
            self.sow(nnx.Intermediate, "on_frac", jnp.mean(on, axis=tuple(range(x.ndim - 1))))
        f = _ACTIVATIONS[self.kind](x)
        return x + self.mask.value * (f - x)


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class Linear(Layer):
    """Dense layer over the last axis; kernel (in, out), torch weight (out, in)."""

    def __init__(self, din: int, dout: int, *, bias: bool = True, rngs: nnx.Rngs,
                 kernel_init=None, bias_init=None):
        self.din, self.dout = din, dout
        bound = 1.0 / math.sqrt(din)  # torch's nn.Linear default for both
        kinit = kernel_init or _uniform(bound)
        binit = bias_init or _uniform(bound)
        self.kernel = nnx.Param(kinit(rngs.params(), (din, dout), jnp.float32))
        self.bias = nnx.Param(binit(rngs.params(), (dout,), jnp.float32)) if bias else None

    def __call__(self, x):
        y = x @ self.kernel.value
        return y + self.bias.value if self.bias is not None else y

    def torch_state(self):
        out = {"weight": np.asarray(self.kernel.value).T}
        if self.bias is not None:
            out["bias"] = np.asarray(self.bias.value)
        return out

    def load_torch_state(self, state, name):
        _set(self.kernel, state["weight"], f"{name}.weight", (self.dout, self.din), lambda w: w.T)
        if self.bias is not None:
            _set(self.bias, state["bias"], f"{name}.bias", (self.dout,), lambda b: b)


class LayerNorm(Layer):
    """LayerNorm over the last axis, torch semantics (biased variance, eps 1e-5)."""

    def __init__(self, dim: int, *, epsilon: float = 1e-5, rngs: nnx.Rngs | None = None):
        del rngs
        self.dim, self.epsilon = dim, epsilon
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale.value + self.bias.value

    def torch_state(self):
        return {"weight": np.asarray(self.scale.value), "bias": np.asarray(self.bias.value)}

    def load_torch_state(self, state, name):
        for suffix, var in (("weight", self.scale), ("bias", self.bias)):
            _set(var, state[suffix], f"{name}.{suffix}", (self.dim,), lambda v: v)


class Add(Layer):
    """Sum of its inputs (residual connections)."""

    def __call__(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class MaxPool(Layer):
    """torch.nn.MaxPool2d (floor mode): padding counts as -inf."""

    def __init__(self, kernel: int, stride: int, padding: int = 0):
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def __call__(self, x):
        p, k, s = self.padding, self.kernel, self.stride
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
        out = None
        for view in _windows(x, (k, k), (s, s)):
            # Strict '>': the first maximum in row-major order wins and alone gets the
            # gradient, as in torch (jnp.maximum would split ties). On CPU this gradient
            # is ~4x faster than reduce_window's select-and-scatter.
            out = view if out is None else jnp.where(view > out, view, out)
        return out


class GlobalAvgPool(Layer):
    """Mean over H and W: (N, H, W, C) -> (N, C)."""

    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2))


def adaptive_bounds(size: int, out: int) -> list[tuple[int, int]]:
    """torch's AdaptiveAvgPool window [start, end) for every output index."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


class AdaptiveAvgPool(Layer):
    """torch.nn.AdaptiveAvgPool2d((oh, ow)): replicates small maps, averages large ones."""

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


class FlattenNCHW(Layer):
    """Flatten in torch's NCHW order, so torch classifier weights apply unchanged."""

    def __call__(self, x):
        return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


class Dropout(Layer):
    """Dropout; identity in eval mode (`deterministic=True`, set by `model.eval()`)."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.rate = rate
        self.deterministic = False
        self.rngs = rngs.fork() if hasattr(rngs, "fork") else rngs

    def __call__(self, x):
        if self.deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        m = jax.random.bernoulli(self.rngs.dropout(), keep, x.shape)
        return jnp.where(m, x / keep, 0.0)
