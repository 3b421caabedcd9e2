"""Convolutions: `Conv`, and `FusedConv`, the layer a fused run of convolutions becomes
when its borders need care (DESIGN.md §7).

`FusedConv` = one conv (the composed kernel) + its interior bias + border terms:
at a few output rows, columns or corner positions, a small kernel (the
difference between the exact kernel there and the interior one, cropped to its
non-zero taps) applied to the same input, and a bias difference, so every
output is still one affine function of the input window: depth 1. The terms
are placed relative to the edges, so one layer is exact at every input size
from its smallest on (`EdgeClasses`); a layer made for one small input size
(fixed) refuses the others. A fused run whose result needs none of this is a
plain `Conv` (or `Linear`).
"""
from __future__ import annotations

import dataclasses
import functools
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


@dataclasses.dataclass(frozen=True)
class EdgeClasses:
    """Border classes of a `FusedConv`'s output positions along one axis (0: none).

    Size-agnostic (`fixed` None): `top[i]` is the class of output position i, the
    same at every input size n >= `least`; `bottom[n % len(bottom)][j]` that of
    position n_out-1-j, which depends on the input size modulo the layer's stride;
    every other position is interior. Fixed (`fixed` = n): `top` lists every position
    of that one input size, `bottom` is `((),)`.
    """
    top: tuple
    bottom: tuple
    least: int
    fixed: int | None = None

    @staticmethod
    def from_config(c: dict) -> "EdgeClasses":
        return EdgeClasses(tuple(c["top"]), tuple(tuple(b) for b in c["bottom"]), c["least"],
                           c.get("fixed"))

    def config(self) -> dict:
        return {"top": list(self.top), "bottom": [list(b) for b in self.bottom],
                "least": self.least, "fixed": self.fixed}

    @property
    def residues(self) -> int:
        return len(self.bottom)

    def slots(self) -> list:
        """Every output position that has a border class at some input size, as
        ((side, k), class per input size modulo `residues`): side 0 is position k,
        side 1 position n_out-1-k."""
        out = [((0, i), (c,) * self.residues) for i, c in enumerate(self.top) if c]
        for j in range(max(map(len, self.bottom))):
            cls = tuple(b[j] if j < len(b) else 0 for b in self.bottom)
            if any(cls):
                out.append(((1, j), cls))
        return out

    def count(self, cls: int, n: int) -> int:
        """Output positions of class `cls` at input size n."""
        return self.top.count(cls) + self.bottom[n % self.residues].count(cls)


@dataclasses.dataclass(frozen=True)
class BorderGeometry:
    """Where a `FusedConv`'s border terms apply and how they read the input: what its
    JAX forward and its torch counterpart share. Sizes `n` may be ints or torch
    symbolic sizes (torch.export), so the arithmetic is the same in both.

    `terms[t]` = ((row class, col class), (u, v), (dh, dw)): border kernel t, at output
    (i, j) read from input rows `stride_h*i + u` .. + dh, cols likewise (a class None:
    every row or column); `bias_terms[t]` = (row class, col class) of edge bias t.
    """
    kernel_size: tuple
    stride: tuple
    padding: tuple
    rows: EdgeClasses
    cols: EdgeClasses
    terms: tuple
    bias_terms: tuple

    def edges(self, axis: int) -> EdgeClasses:
        return (self.rows, self.cols)[axis]

    def shift(self, axis: int) -> int:
        """`n_out = (n + shift) // stride + 1` along `axis` for an input of n."""
        lo, hi = self.padding[axis]
        return lo + hi - self.kernel_size[axis]

    def out_size(self, h, w) -> tuple:
        return tuple((n + self.shift(a)) // self.stride[a] + 1 for a, n in enumerate((h, w)))

    def residue(self, h, w):
        """Index into the plans' tables for an (h, w) input."""
        return (h % self.rows.residues) * self.cols.residues + w % self.cols.residues

    def _plan(self, classes: list) -> tuple:
        """(row slot, col slot, term index or None per residue pair) of every place terms
        at these class pairs apply; a slot None: every row (column)."""
        terms = {rc: t for t, rc in enumerate(classes)}
        rs, cs = self.rows.slots(), self.cols.slots()
        nr, nc = self.rows.residues, self.cols.residues

        def table(rcls, ccls):
            return tuple(terms.get((None if rcls is None else rcls[a],
                                    None if ccls is None else ccls[b]))
                         for a in range(nr) for b in range(nc))
        plan = [(rslot, None, table(rcls, None)) for rslot, rcls in rs]
        plan += [(None, cslot, table(None, ccls)) for cslot, ccls in cs]
        plan += [(rslot, cslot, table(rcls, ccls)) for rslot, rcls in rs for cslot, ccls in cs]
        return tuple(p for p in plan if any(t is not None for t in p[2]))

    @functools.cached_property
    def kernel_plan(self) -> tuple:
        return self._plan([rc for rc, _, _ in self.terms])

    @functools.cached_property
    def bias_plan(self) -> tuple:
        return self._plan(list(self.bias_terms))

    def union(self, table) -> tuple[tuple[int, int], tuple[int, int]]:
        """The input window ((u, dh), (v, dw)) covering every term of a plan entry."""
        used = [self.terms[t] for t in table if t is not None]
        return tuple((min(uv[a] for _, uv, _ in used),
                      max(uv[a] + d[a] for _, uv, d in used) - min(uv[a] for _, uv, _ in used))
                     for a in (0, 1))

    def _windows(self, axis: int):
        """(side, first, end) of every border kernel window along `axis`: side 0 from the
        first input row, side 1 from the input's end where the stride grid ends last (it
        ends up to stride - 1 rows earlier at other sizes)."""
        s, c = self.stride[axis], self.shift(axis)
        for entry in self.kernel_plan:
            slot = entry[axis]
            if slot is not None:
                side, k = slot
                t0, d = self.union(entry[2])[axis]
                start = s * k + t0 if side == 0 else c - s * k + t0
                yield side, start, start + d

    @functools.cached_property
    def border_pad(self) -> tuple:
        """Per axis: zero padding (lo, hi) of the input, and the lengths of the strips of
        the padded input at its start and at its end that hold every border window at
        every input size from the smallest on."""
        out = []
        for axis in (0, 1):
            s, least = self.stride[axis], self.edges(axis).least
            top = [(a, b) for side, a, b in self._windows(axis) if side == 0]
            bottom = [(a - (s - 1), b) for side, a, b in self._windows(axis) if side == 1]
            lo = max([0] + [-a for a, _ in top] + [-(least + a) for a, _ in bottom])
            hi = max([0] + [b - least for _, b in top] + [b for _, b in bottom])
            out.append((lo, hi, max([0] + [lo + b for _, b in top]),
                        max([0] + [hi - a for a, _ in bottom])))
        return tuple(out)

    def window(self, axis: int, slot, t0: int, d: int, n):
        """How a border kernel of `d` taps from `t0` reads the padded input along `axis`:
        (strip, start, padding, stride). At one output position (`slot` (side, k)): rows
        [start, start + d) of the strip at that side (0 start, 1 end); along every position
        (`slot` None): the whole padded axis (strip None), read with the layer's stride
        and the padding that makes output p read input `stride*p + t0` on. `n`: the input
        size along `axis`."""
        s, c = self.stride[axis], self.shift(axis)
        lo, hi, _, end_len = self.border_pad[axis]
        if slot is None:
            return None, None, (-t0 - lo, c + d + t0 - hi), s
        side, k = slot
        if side == 0:
            return 0, lo + s * k + t0, (0, 0), 1
        return 1, end_len - hi + c - (n + c) % s - s * k + t0, (0, 0), 1

    @staticmethod
    def out_index(slot, n_out):
        """The output position of `slot` along an axis of `n_out` (None: every position)."""
        if slot is None:
            return None
        side, k = slot
        return k if side == 0 else n_out - 1 - k


class FusedConv(Layer):
    """A fused conv, exact at every border: one conv + a bias + border terms.

    The base conv (`kernel` (kh, kw, cin/groups, cout), `stride`, `padding`
    ((lo, hi), (lo, hi)), hi possibly negative: a crop) with the interior `bias`
    (cout) is the composed run away from the borders. Near them, positions get a
    border class per axis (`rows`, `cols`: `EdgeClasses`), and each class, or pair
    of a row and a column class, adds a term:

    * `border[t]` (dh, dw, cin/groups, cout) at `border_at[t]` = (row class, col
      class, (u, v)): a kernel applied at output (i, j) to input rows
      `stride_h*i + u + a`, cols `stride_w*j + v + b` (zero outside the input); a
      class of None means every row (column): a strip along the other axis;
    * `edge_bias[t]` (cout) at `bias_at[t]` = (row class, col class), likewise.

    A row class's term holds on its whole row; the column and corner terms correct
    the rest (exact kernel at (r, c) = interior + row part + column part + corner
    part), so every output is still one affine function of its input window: depth 1.

    Size-agnostic (`rows.fixed` None): the classes are counted from each edge, and the
    last ones depend on the input size modulo the stride, so the layer is exact at
    every input size from `rows.least` x `cols.least` on; smaller inputs are refused.
    Fixed: made for one input size, others are refused. `model_size` is the model
    input size named in refusals: the smallest it runs at, or the one it was made for.

    Merging treats it as a boundary (linear kind None): it is the output of a merge,
    and its border terms would not compose with a neighbour's.
    """
    torch_counterpart = "FusedConv"

    def __init__(self, cin: int, cout: int, kernel_size: tuple[int, int], *, stride, padding,
                 groups: int, rows: dict, cols: dict, border_at=(), border_shapes=(),
                 bias_at=(), model_size):
        self.cin, self.cout, self.groups = cin, cout, groups
        self.model_size = tuple(model_size)
        self.geometry = BorderGeometry(
            tuple(kernel_size), tuple(stride), tuple(tuple(p) for p in padding),
            EdgeClasses.from_config(rows), EdgeClasses.from_config(cols),
            tuple(((r, c), tuple(uv), tuple(d)) for (r, c, uv), d in zip(border_at, border_shapes)),
            tuple((r, c) for r, c in bias_at))
        kh, kw = self.kernel_size
        self.kernel = nnx.Param(_zeros((kh, kw, cin // groups, cout)))
        self.bias = nnx.Param(_zeros((cout,)))
        self.edge_bias = (nnx.Param(_zeros((len(self.geometry.bias_terms), cout)))
                          if self.geometry.bias_terms else None)
        self.border = nnx.List([nnx.Param(_zeros((dh, dw, cin // groups, cout)))
                                for dh, dw in border_shapes])

    kernel_size = property(lambda self: self.geometry.kernel_size)
    stride = property(lambda self: self.geometry.stride)
    padding = property(lambda self: self.geometry.padding)
    rows = property(lambda self: self.geometry.rows)
    cols = property(lambda self: self.geometry.cols)

    @property
    def fixed(self) -> bool:
        return self.rows.fixed is not None

    def config(self) -> dict:
        g = self.geometry
        return {"cin": self.cin, "cout": self.cout, "kernel_size": list(g.kernel_size),
                "stride": list(g.stride), "padding": [list(p) for p in g.padding],
                "groups": self.groups, "rows": g.rows.config(), "cols": g.cols.config(),
                "border_at": [[r, c, list(uv)] for (r, c), uv, _ in g.terms],
                "border_shapes": [list(d) for *_, d in g.terms],
                "bias_at": [[r, c] for r, c in g.bias_terms],
                "model_size": list(self.model_size)}

    def linear_kind(self):
        return None

    def weight_layers(self):
        return 1

    def input_sizes(self):
        return ("fixed" if self.fixed else "min"), self.model_size

    def least(self) -> tuple[int, int]:
        """The smallest input (h, w) of this layer (the only one when fixed)."""
        return self.rows.least, self.cols.least

    def check_size(self, h: int, w: int) -> None:
        mh, mw = self.model_size
        if self.fixed:
            if (h, w) != (self.rows.fixed, self.cols.fixed):
                raise UserError(
                    f"this merged model was fused for {mh}x{mw} inputs (its border terms "
                    f"depend on the size; a fused layer made for {self.rows.fixed}x"
                    f"{self.cols.fixed} maps got {h}x{w}); merge the linearized model again "
                    f"for your input size: jaxprune.merge(m, input_size=(H, W))")
        elif h < self.rows.least or w < self.cols.least:
            raise UserError(
                f"this merged model runs at inputs of at least {mh}x{mw} (below that its "
                f"border terms overlap; a fused layer made for maps of at least "
                f"{self.rows.least}x{self.cols.least} got {h}x{w}); use a larger input, or "
                f"merge the linearized model for your input size: "
                f"jaxprune.merge(m, input_size=(H, W))")

    def border_params(self) -> int:
        """Parameters that only exist to keep the layer exact at the borders."""
        kernels = sum(int(np.prod(k.value.shape)) for k in self.border)
        return kernels + (0 if self.edge_bias is None else int(np.prod(self.edge_bias.value.shape)))

    def border_macs(self, h: int, w: int) -> int:
        """MACs of the border kernels on an (h, w) input (edge biases are additions)."""
        ho, wo = self.geometry.out_size(h, w)
        total, res = 0, self.geometry.residue(h, w)
        for rslot, cslot, table in self.geometry.kernel_plan:
            t = table[res]
            if t is not None:
                positions = (1 if cslot is not None else wo) * (1 if rslot is not None else ho)
                total += _conv_macs((1, positions, 1, self.cout), self.border[t].value.shape)
        return total

    def macs(self, in_shapes, out_shape) -> int:
        """The base conv plus the border kernels at this input size."""
        h, w = in_shapes[0][1:3]
        return _conv_macs(out_shape, self.kernel.value.shape) + self.border_macs(h, w)

    def __call__(self, x):
        g = self.geometry
        h, w = x.shape[1:3]
        self.check_size(h, w)
        y = conv2d(x, self.kernel.value, g.stride, g.padding, self.groups) + self.bias.value
        ho, wo = y.shape[1:3]
        res = g.residue(h, w)
        for rslot, cslot, table in g.bias_plan:
            if table[res] is not None:
                y = y.at[:, _at(g.out_index(rslot, ho)),
                         _at(g.out_index(cslot, wo))].add(self.edge_bias.value[table[res]])
        if not g.kernel_plan:
            return y
        (plo, phi, *_), (qlo, qhi, *_) = g.border_pad
        xp = jnp.pad(x, ((0, 0), (plo, phi), (qlo, qhi), (0, 0)))
        for rslot, cslot, table in g.kernel_plan:
            t = table[res]
            if t is None:
                continue
            k, uv = self.border[t].value, g.terms[t][1]
            win, pads, strides = xp, [], []
            for axis, (slot, n) in enumerate(((rslot, h), (cslot, w))):
                strip, start, pad, s = g.window(axis, slot, uv[axis], k.shape[axis], n)
                if strip is not None:
                    _, _, start_len, end_len = g.border_pad[axis]
                    size = win.shape[axis + 1]
                    first = start if strip == 0 else size - end_len + start
                    win = jax.lax.slice_in_dim(win, first, first + k.shape[axis], axis=axis + 1)
                pads.append(pad)
                strides.append(s)
            out = _border_conv(win, k, rslot is not None, cslot is not None, tuple(strides),
                               tuple(pads), self.groups)
            y = y.at[:, _at(g.out_index(rslot, ho)), _at(g.out_index(cslot, wo))].add(out)
        return y

    def torch_state(self):
        out = {"weight": np.asarray(self.kernel.value).transpose(3, 2, 0, 1),
               "bias": np.asarray(self.bias.value)}
        if self.edge_bias is not None:
            out["edge_bias"] = np.asarray(self.edge_bias.value)
        for n, k in enumerate(self.border):
            out[f"border.{n}"] = np.asarray(k.value).transpose(3, 2, 0, 1)
        return out

    def load_torch_state(self, state, name):
        expected = self.torch_state()
        oihw = lambda a: a.transpose(2, 3, 1, 0)  # noqa: E731
        same = lambda a: a  # noqa: E731
        targets = {"weight": (self.kernel, oihw), "bias": (self.bias, same)}
        if self.edge_bias is not None:
            targets["edge_bias"] = (self.edge_bias, same)
        targets.update({f"border.{n}": (k, oihw) for n, k in enumerate(self.border)})
        for key, (var, to_jax) in targets.items():
            value = np.asarray(state[key], np.float32)
            check_shape(f"{name}.{key}", value.shape, expected[key].shape)
            var.value = jnp.asarray(to_jax(value))


def _border_conv(win, k, one_row: bool, one_col: bool, stride, padding, groups: int):
    """A border kernel `k` (dh, dw, cin/groups, cout) over its window `win` of the input:
    at one position (`one_row` and `one_col`: `win` is exactly (N, dh, dw, cin)) a single
    contraction -> (N, cout); along a row (column) strip of dh rows (dw columns) a conv
    along the other axis with the strip's rows (columns) folded into the channels ->
    (N, positions, cout). Both keep the program one op per term: a conv whose output is
    one row would take `conv_as_matmul`'s dh*dw shifted windows, slow to compile."""
    dh, dw, ci, cout = k.shape
    n = win.shape[0]
    if one_row and one_col:
        return jnp.einsum("nabgc,abcgo->ngo", win.reshape(n, dh, dw, groups, ci),
                          k.reshape(dh, dw, ci, groups, cout // groups)).reshape(n, cout)
    if one_col:  # a column strip: the same with the axes swapped
        return _border_conv(win.transpose(0, 2, 1, 3), k.transpose(1, 0, 2, 3), True, False,
                            stride[::-1], padding[::-1], groups)
    length = win.shape[2]   # the row strip's dh rows folded into the channels, per group
    folded = (win.reshape(n, dh, length, groups, ci).transpose(0, 2, 3, 1, 4)
              .reshape(n, 1, length, groups * dh * ci))
    kernel = k.transpose(1, 0, 2, 3).reshape(1, dw, dh * ci, cout)
    out = jax.lax.conv_general_dilated(folded, kernel, (1, stride[1]), ((0, 0), padding[1]),
                                       dimension_numbers=_DN, feature_group_count=groups)
    return out[:, 0]


def _at(index):
    """An output index along one axis: one position, or all (None)."""
    return slice(None) if index is None else index
