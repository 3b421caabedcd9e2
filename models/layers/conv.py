"""Convolutions: `Conv`, and `FusedConv`, the layer a fused run of convolutions becomes
when its borders need care (DESIGN.md §7).

`FusedConv` = one conv (the composed kernel, cropped to the taps that ever read
real input) + a bias or a position-dependent bias map + sparse border
corrections. A correction adds, at a few output rows, columns or corner
positions, a small kernel (the difference between the exact kernel there and
the interior one, cropped to its non-zero taps) applied to the same input, so
every output is still one affine function of the input window: depth 1.
The border data are fixed for one input size (`in_size`); another size is
refused with the way to merge for it. A fused run whose result needs none of
this is a plain `Conv` (or `Linear`).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError
from models.layers.base import Layer, Pad, check_shape, pair, set_from_torch, sym_pad, windows
from models.layers.initializers import kaiming_normal_fan_out

_DN = ("NHWC", "HWIO", "NHWC")


def conv_as_matmul(x, kernel, stride: tuple[int, int], padding: Pad, groups: int = 1,
                   dilation: tuple[int, int] = (1, 1)):
    """`lax.conv_general_dilated` (NHWC, HWIO, explicit padding, groups, dilation) as one
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
    stacked = jnp.stack(windows(x, (kh, kw), stride, dilation), axis=3)
    n, oh, ow = stacked.shape[:3]
    stacked = stacked.reshape(n, oh, ow, kh * kw, groups, cin_g)
    k = kernel.reshape(kh * kw, cin_g, groups, cout // groups)
    return jnp.einsum("nhwpgc,pcgo->nhwgo", stacked, k).reshape(n, oh, ow, cout)


def small_map(in_hw, kernel_size, stride, padding) -> bool:
    """Input or output map smaller than the kernel (its dilated extent): forward or
    gradient convolutions would leave XLA CPU's fast path (see `conv_as_matmul`)."""
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel_size, stride, padding
    h, w = in_hw
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    return min(h, oh) < kh or min(w, ow) < kw


def conv2d(x, kernel, stride, padding, groups: int, dilation: tuple[int, int] = (1, 1)):
    """A conv with explicit, possibly negative (cropping) padding and kernel taps
    `dilation` apart, NHWC/HWIO; on maps smaller than the kernel it is `conv_as_matmul`."""
    if isinstance(padding, str):  # "VALID"
        padding = ((0, 0), (0, 0))
    (pt, pb), (pl, pr) = padding
    x = x[:, max(-pt, 0):x.shape[1] - max(-pb, 0), max(-pl, 0):x.shape[2] - max(-pr, 0)]
    padding = ((max(pt, 0), max(pb, 0)), (max(pl, 0), max(pr, 0)))
    extent = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel.shape[:2]))
    if small_map(x.shape[1:3], extent, stride, padding):
        return conv_as_matmul(x, kernel, stride, padding, groups, dilation)
    return jax.lax.conv_general_dilated(x, kernel, stride, padding, rhs_dilation=dilation,
                                        dimension_numbers=_DN, feature_group_count=groups)


def _conv_macs(out_shape: tuple, kernel_shape: tuple) -> int:
    """MACs of a conv: every output value reads kh * kw * cin/groups inputs."""
    kh, kw, cin_g, _ = kernel_shape
    return math.prod(out_shape[1:]) * kh * kw * cin_g


class Conv(Layer):
    """2-D convolution, NHWC, kernel HWIO, explicit symmetric padding, optional groups and
    dilation. Merging composes undilated convs only: a dilated one bounds the runs."""
    torch_counterpart = "Conv"

    def __init__(self, cin: int, cout: int, kernel: int | Sequence[int], *, stride=1, padding=0,
                 groups: int = 1, dilation=1, bias: bool = False, rngs: nnx.Rngs,
                 kernel_init=None):
        kh, kw = pair(kernel)
        if cin % groups or cout % groups:
            raise ValueError(f"channels {cin}->{cout} not divisible by groups={groups}")
        self.cin, self.cout, self.groups = cin, cout, groups
        self.kernel_size = (kh, kw)
        self.stride = pair(stride)
        self.padding = sym_pad(padding)
        self.dilation = pair(dilation)
        # torchvision's default for conv layers: kaiming normal, fan_out, relu gain
        init = kernel_init or kaiming_normal_fan_out()
        self.kernel = nnx.Param(init(rngs.params(), (kh, kw, cin // groups, cout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32)) if bias else None

    def __call__(self, x):
        y = conv2d(x, self.kernel.value, self.stride, self.padding, self.groups, self.dilation)
        if self.bias is not None:
            y = y + self.bias.value
        return y

    def config(self):
        return dict(cin=self.cin, cout=self.cout, kernel=list(self.kernel_size),
                    stride=list(self.stride), padding=[list(p) for p in self.padding],
                    groups=self.groups, dilation=list(self.dilation), bias=self.bias is not None)

    def macs(self, in_shapes, out_shape):
        return _conv_macs(out_shape, self.kernel.value.shape)

    def linear_kind(self):
        return "conv" if self.dilation == (1, 1) else None

    def weight_layers(self):
        return 1

    def torch_state(self):
        out = {"weight": np.asarray(self.kernel.value).transpose(3, 2, 0, 1)}
        if self.bias is not None:
            out["bias"] = np.asarray(self.bias.value)
        return out

    def load_torch_state(self, state, name):
        kh, kw, ci, co = self.kernel.value.shape
        set_from_torch(self.kernel, state["weight"], f"{name}.weight", (co, ci, kh, kw),
                       lambda w: w.transpose(2, 3, 1, 0))
        if self.bias is not None:
            set_from_torch(self.bias, state["bias"], f"{name}.bias", (co,), lambda b: b)


def _zeros(shape):
    return jnp.asarray(np.zeros(shape, np.float32))  # a transfer, not a compiled op per shape


class FusedConv(Layer):
    """A fused conv, exact at the borders of a fixed input size.

    Static: `in_size`, `out_size` (H, W); `stride`; `groups`; `padding`
    ((lo, hi), (lo, hi)) of the base conv (hi may be negative: a crop);
    `border_at`: per correction `(rows, cols, (u, v))`, where `rows`/`cols`
    are output indices (None = all) and the correction at output (i, j) reads
    input rows `stride_h*i + u + a`, cols `stride_w*j + v + b` (zero outside).
    Parameters: `kernel` (kh, kw, cin/groups, cout), `bias` (cout) or
    `bias_map` (Ho, Wo, cout), `border[k]` (dh, dw, cin/groups, cout).

    Merging treats it as a boundary (linear kind None): it is the output of a merge,
    and its border data would not compose with a neighbour's.
    """
    torch_counterpart = "FusedConv"

    def __init__(self, cin: int, cout: int, kernel_size: tuple[int, int], *, stride, padding,
                 groups: int, in_size, out_size, bias_map: bool, border_at=(),
                 border_shapes=(), model_size=None):
        self.cin, self.cout, self.groups = cin, cout, groups
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = tuple(tuple(p) for p in padding)
        self.in_size, self.out_size = tuple(in_size), tuple(out_size)
        # the model input size the border data were made for (for the error message)
        self.model_size = tuple(model_size) if model_size is not None else self.in_size
        self.border_at = tuple((None if r is None else tuple(r), None if c is None else tuple(c),
                                tuple(uv)) for r, c, uv in border_at)
        kh, kw = self.kernel_size
        self.kernel = nnx.Param(_zeros((kh, kw, cin // groups, cout)))
        ho, wo = self.out_size
        if bias_map:
            self.bias, self.bias_map = None, nnx.Param(_zeros((ho, wo, cout)))
        else:
            self.bias, self.bias_map = nnx.Param(_zeros((cout,))), None
        self.border = nnx.List([nnx.Param(_zeros((dh, dw, cin // groups, cout)))
                                for dh, dw in border_shapes])
        self.border_pad = self._border_pad()

    def config(self) -> dict:
        return {"cin": self.cin, "cout": self.cout, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "padding": [list(p) for p in self.padding],
                "groups": self.groups, "in_size": list(self.in_size),
                "out_size": list(self.out_size), "model_size": list(self.model_size),
                "bias_map": self.bias_map is not None,
                "border_at": [[None if r is None else list(r), None if c is None else list(c),
                               list(uv)] for r, c, uv in self.border_at],
                "border_shapes": [list(b.value.shape[:2]) for b in self.border]}

    def linear_kind(self):
        return None

    def weight_layers(self):
        return 1

    def _border_pad(self):
        """Input padding that makes every correction's window an in-bounds slice."""
        (sh, sw), (ho, wo), (h, w) = self.stride, self.out_size, self.in_size
        lo, hi = [0, 0], [0, 0]
        for (rows, cols, uv), k in zip(self.border_at, self.border):
            for ax, (pos, n, s, size, d) in enumerate(((rows, ho, sh, h, 0), (cols, wo, sw, w, 1))):
                pos = range(n) if pos is None else pos
                first, last = min(pos), max(pos)
                lo[ax] = max(lo[ax], -(s * first + uv[ax]))
                hi[ax] = max(hi[ax], s * last + uv[ax] + k.value.shape[d] - size)
        return (lo[0], hi[0]), (lo[1], hi[1])

    def windows(self):
        """Each correction as (kernel index, rows, cols, row start, col start, stride) on the
        input padded by `border_pad`; rows/cols None = every output row/col (one strip)."""
        (sh, sw), (plo, _), (qlo, _) = self.stride, *self.border_pad
        for n, (rows, cols, (u, v)) in enumerate(self.border_at):
            if cols is None:
                for i in rows:
                    yield n, i, None, sh * i + u + plo, v + qlo, (1, sw)
            elif rows is None:
                for j in cols:
                    yield n, None, j, u + plo, sw * j + v + qlo, (sh, 1)
            else:
                for i in rows:
                    for j in cols:
                        yield n, i, j, sh * i + u + plo, sw * j + v + qlo, (1, 1)

    def check_size(self, h: int, w: int) -> None:
        if (h, w) != self.in_size:
            mh, mw = self.model_size
            raise UserError(
                f"this merged model was fused for {mh}x{mw} inputs (its border corrections "
                f"depend on the size; a fused layer made for {self.in_size[0]}x"
                f"{self.in_size[1]} maps got {h}x{w}); merge the linearized model again for "
                f"your input size: jaxprune.merge(m, input_size=(H, W))")

    def macs(self, in_shapes=None, out_shape=None) -> int:
        """The base conv plus the corrections (the layer's own sizes; the shapes are its)."""
        ho, wo = self.out_size
        total = _conv_macs((1, ho, wo, self.cout), self.kernel.value.shape)
        for n, i, j, *_ in self.windows():
            positions = wo if j is None else ho if i is None else 1
            total += _conv_macs((1, positions, 1, self.cout), self.border[n].value.shape)
        return total

    def __call__(self, x):
        self.check_size(*x.shape[1:3])
        y = conv2d(x, self.kernel.value, self.stride, self.padding, self.groups)
        y = y + (self.bias_map.value if self.bias_map is not None else self.bias.value)
        if len(self.border):
            (plo, phi), (qlo, qhi) = self.border_pad
            xp = jnp.pad(x, ((0, 0), (plo, phi), (qlo, qhi), (0, 0)))
            ho, wo = self.out_size
            sh, sw = self.stride
            for n, i, j, r0, c0, stride in self.windows():
                k = self.border[n].value
                dh, dw = k.shape[:2]
                rows = dh if i is not None else sh * (ho - 1) + dh
                cols = dw if j is not None else sw * (wo - 1) + dw
                out = conv2d(xp[:, r0:r0 + rows, c0:c0 + cols], k, stride, "VALID", self.groups)
                y = y.at[:, slice(None) if i is None else slice(i, i + 1),
                         slice(None) if j is None else slice(j, j + 1)].add(out)
        return y

    def torch_state(self):
        out = {"weight": np.asarray(self.kernel.value).transpose(3, 2, 0, 1)}
        if self.bias_map is not None:
            out["bias_map"] = np.asarray(self.bias_map.value).transpose(2, 0, 1)
        else:
            out["bias"] = np.asarray(self.bias.value)
        for n, k in enumerate(self.border):
            out[f"border.{n}"] = np.asarray(k.value).transpose(3, 2, 0, 1)
        return out

    def load_torch_state(self, state, name):
        expected = self.torch_state()
        oihw = lambda a: a.transpose(2, 3, 1, 0)  # noqa: E731
        targets = {"weight": (self.kernel, oihw)}
        if self.bias_map is not None:
            targets["bias_map"] = (self.bias_map, lambda a: a.transpose(1, 2, 0))
        else:
            targets["bias"] = (self.bias, lambda a: a)
        targets.update({f"border.{n}": (k, oihw) for n, k in enumerate(self.border)})
        for key, (var, to_jax) in targets.items():
            value = np.asarray(state[key], np.float32)
            check_shape(f"{name}.{key}", value.shape, expected[key].shape)
            var.value = jnp.asarray(to_jax(value))
