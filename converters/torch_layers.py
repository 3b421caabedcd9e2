"""The torch counterpart of every jaxprune layer kind, named by the kind's
`torch_counterpart` (models/layers/base.py): what `converters.to_torch` builds.

Each torch counterpart computes what the jaxprune layer computes in eval mode
and declares the layout it wants a 4-D input in: `"nchw"` (convs, BatchNorm,
pooling: torch's native layout, so no transposes around them), `"nhwc"`
(layers on the channel axis: Linear, LayerNorm, Swin attention), or
`"same"` (elementwise layers, which take either and are told which by
`channels_first`). Parameter names follow the jaxprune layer's
`torch_state()`, so one `load_state_dict(strict=True)` fills a whole model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jaxprune.errors import UserError
from models import layers as L


class _Same(nn.Module):
    layout = "same"


def _conv_plan(padding, stride):
    """How torch runs a conv with jaxprune's ((lo, hi), (lo, hi)) padding without copying
    the input when it can: (F.pad argument or None, conv padding, first output row/col to
    keep). A larger symmetric padding computes a few extra first rows, sliced off; the
    output's end is always exact, so the same holds for symbolic sizes (torch.export)."""
    pads, starts = [], []
    for (lo, hi), s in zip(padding, stride):
        if lo == hi:
            pads.append(lo)
            starts.append(0)
        elif lo < hi and (hi - lo) % s == 0:
            pads.append(hi)
            starts.append((hi - lo) // s)
        else:
            (plo, phi), (qlo, qhi) = padding
            return (qlo, qhi, plo, phi), (0, 0), (0, 0)
    return None, tuple(pads), tuple(starts)


def _conv(x, weight, bias, stride, padding, groups, plan, dilation=(1, 1)):
    """F.conv2d with jaxprune's padding (`plan`: `_conv_plan`; the first rows / columns a
    larger symmetric padding adds are sliced off)."""
    pre_pad, conv_pad, (r0, c0) = plan
    if pre_pad is not None:
        return F.conv2d(F.pad(x, pre_pad), weight, bias, stride, 0, dilation, groups)
    y = F.conv2d(x, weight, bias, stride, conv_pad, dilation, groups)
    return y[:, :, r0:, c0:] if r0 or c0 else y


class Conv(nn.Conv2d):
    layout = "nchw"

    def __init__(self, layer: L.Conv):
        super().__init__(layer.cin, layer.cout, layer.kernel_size, layer.stride,
                         dilation=layer.dilation, groups=layer.groups,
                         bias=layer.bias is not None)
        self.jax_padding = layer.padding
        self.plan = _conv_plan(layer.padding, layer.stride)

    def forward(self, x):
        return _conv(x, self.weight, self.bias, self.stride, self.jax_padding, self.groups,
                     self.plan, self.dilation)


def _add_at(y, i, j, value) -> None:
    """y[:, :, i, j] += value in place; i or j None: every row or column."""
    if i is not None:
        y = y.narrow(2, i, 1)
    if j is not None:
        y = y.narrow(3, j, 1)
    y.add_(value)


class FusedConv(nn.Module):
    """`models.layers.FusedConv` in torch (NCHW): base conv + bias + border terms, placed
    by the layer's own `BorderGeometry`, so one module runs at every input size the layer
    takes, traced with symbolic sizes too (`torch.export` with dynamic height and width):
    the terms of positions counted from the end, which depend on the size modulo the
    stride, are picked by indexing with that residue."""
    layout = "nchw"

    def __init__(self, layer: L.FusedConv):
        super().__init__()
        g = self.geometry = layer.geometry
        kh, kw = g.kernel_size
        ci = layer.cin // layer.groups
        self.weight = nn.Parameter(torch.zeros(layer.cout, ci, kh, kw))
        self.bias = nn.Parameter(torch.zeros(layer.cout))
        self.edge_bias = (nn.Parameter(torch.zeros(len(g.bias_terms), layer.cout))
                          if g.bias_terms else None)
        self.border = nn.ParameterList(
            [nn.Parameter(torch.zeros(layer.cout, ci, *d)) for *_, d in g.terms])
        self.groups = layer.groups
        self.plan = _conv_plan(g.padding, g.stride)
        # per bias plan entry: edge bias row per residue pair (the last row: zeros)
        for n, (*_, table) in enumerate(g.bias_plan):
            self.register_buffer(f"bias_rows{n}", torch.tensor(
                [len(g.bias_terms) if t is None else t for t in table]), persistent=False)

    def _kernel(self, table, res):
        """The border kernel of a plan entry at residue `res`, and its (u, v): the term's
        own where every residue has the same, else all of them on their common window,
        indexed by the residue (zeros where a residue has none)."""
        g = self.geometry
        if len(set(table)) == 1:
            return self.border[table[0]], g.terms[table[0]][1]
        (u, dh), (v, dw) = g.union(table)
        ks = []
        for t in table:
            if t is None:
                ks.append(self.weight.new_zeros(self.weight.shape[0], self.weight.shape[1], dh, dw))
                continue
            (a, b), (kh, kw) = g.terms[t][1:]
            ks.append(F.pad(self.border[t], (b - v, v + dw - b - kw, a - u, u + dh - a - kh)))
        return torch.stack(ks)[res], (u, v)

    def forward(self, x):
        g = self.geometry
        h, w = x.shape[2], x.shape[3]
        y = _conv(x, self.weight, self.bias, g.stride, g.padding, self.groups, self.plan)
        ho, wo = y.shape[2], y.shape[3]
        res = g.residue(h, w)
        if g.bias_plan:
            rows = torch.cat([self.edge_bias, self.edge_bias.new_zeros(1, y.shape[1])])
            for n, (rslot, cslot, _) in enumerate(g.bias_plan):
                b = rows[getattr(self, f"bias_rows{n}")[res]]
                _add_at(y, g.out_index(rslot, ho), g.out_index(cslot, wo), b[:, None, None])
        if not g.kernel_plan:
            return y
        (plo, phi, *_), (qlo, qhi, *_) = g.border_pad
        xp = F.pad(x, (qlo, qhi, plo, phi))
        for rslot, cslot, table in g.kernel_plan:
            k, uv = self._kernel(table, res)
            win, pads, strides = xp, [], []
            for axis, (slot, n) in enumerate(((rslot, h), (cslot, w))):
                d = k.shape[2 + axis]
                strip, start, pad, s = g.window(axis, slot, uv[axis], d, n)
                if strip is not None:
                    end_len = g.border_pad[axis][3]
                    if strip == 1:  # the strip at the end: its start is the size minus a constant
                        win = win.narrow(2 + axis, win.shape[2 + axis] - end_len, end_len)
                    win = win.narrow(2 + axis, start, d)
                pads.append(pad)
                strides.append(s)
            out = _conv(win, k, None, tuple(strides), tuple(pads), self.groups,
                        _conv_plan(tuple(pads), tuple(strides)))
            _add_at(y, g.out_index(rslot, ho), g.out_index(cslot, wo), out)
        return y


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """Eval-mode BatchNorm over channels (dim 1): (N, C) or (N, C, H, W)."""
    layout = "nchw"

    def __init__(self, layer: L.BatchNorm):
        super().__init__(layer.num_features, eps=layer.epsilon, momentum=1 - layer.momentum)

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"BatchNorm expects (N, C) or (N, C, H, W), got {tuple(x.shape)}")


# the torch function of every activation kind (models.layers.ACTIVATIONS); F.gelu is exact (erf)
_ACTS = {"relu": F.relu, "relu6": F.relu6, "gelu": F.gelu, "silu": F.silu,
         "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "sigmoid": torch.sigmoid}


class Act(_Same):
    """An activation site: the activation (mask 1), identity (mask 0) or the blend between."""

    def __init__(self, layer: L.Act):
        super().__init__()
        self.kind = layer.kind
        mask = torch.tensor(layer.mask.value.tolist(), dtype=torch.float32)
        self.mode = ("act" if bool((mask == 1).all()) else
                     "identity" if bool((mask == 0).all()) else "blend")
        # NHWC-broadcastable as in jaxprune; not in the state dict (arch.json keeps masks)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x, channels_first: bool):
        if self.mode == "identity":
            return x
        f = _ACTS[self.kind](x)
        if self.mode == "act":
            return f
        m = self.mask
        if channels_first and x.dim() == 4 and m.dim() >= 1:
            m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)).permute(0, 3, 1, 2)
        return x + m * (f - x)


class Identity(_Same):
    """Dropout and stochastic depth in eval mode."""

    def __init__(self, layer=None):
        super().__init__()

    def forward(self, x, channels_first: bool):
        return x


class Add(_Same):
    def __init__(self, layer=None):
        super().__init__()

    def forward(self, *xs, channels_first: bool):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Mul(_Same):
    def __init__(self, layer=None):
        super().__init__()

    def forward(self, a, b, channels_first: bool):
        return a * b


class Concat(_Same):
    """Channel concatenation: dim 1 of NCHW maps, the last dim otherwise."""

    def __init__(self, layer=None):
        super().__init__()

    def forward(self, *xs, channels_first: bool):
        return torch.cat(xs, 1 if channels_first and xs[0].dim() == 4 else -1)


class Scale(_Same):
    """A per-channel factor held as the torch parameter `layer.param` in its torch shape."""

    def __init__(self, layer: L.Scale):
        super().__init__()
        self.param = layer.param
        self.register_parameter(layer.param, nn.Parameter(torch.ones(layer.torch_shape)))

    def forward(self, x, channels_first: bool):
        gamma = getattr(self, self.param).reshape(-1)
        if channels_first and x.dim() == 4:
            gamma = gamma.reshape(-1, 1, 1)
        return x * gamma


class GlobalAvgPool(_Same):
    def __init__(self, layer=None):
        super().__init__()

    def forward(self, x, channels_first: bool):
        return x.mean((2, 3) if channels_first else (1, 2))


class Linear(nn.Linear):
    layout = "nhwc"

    def __init__(self, layer: L.Linear):
        super().__init__(layer.din, layer.dout, bias=layer.bias is not None)


class LayerNorm(nn.LayerNorm):
    layout = "nhwc"

    def __init__(self, layer: L.LayerNorm):
        super().__init__(layer.dim, eps=layer.epsilon)


class MaxPool(nn.MaxPool2d):
    layout = "nchw"

    def __init__(self, layer: L.MaxPool):
        super().__init__(layer.kernel, layer.stride, layer.padding)


class AvgPool(nn.AvgPool2d):
    layout = "nchw"

    def __init__(self, layer: L.AvgPool):
        super().__init__(layer.kernel, layer.stride, layer.padding,
                         count_include_pad=layer.count_include_pad)


class AdaptiveAvgPool(nn.AdaptiveAvgPool2d):
    layout = "nchw"

    def __init__(self, layer: L.AdaptiveAvgPool):
        super().__init__(layer.out_hw)


class FlattenNCHW(nn.Module):
    layout = "nchw"

    def __init__(self, layer=None):
        super().__init__()

    def forward(self, x):
        return torch.flatten(x, 1)


class PatchMerging(nn.Module):
    """torchvision's `_patch_merging_pad` (NHWC), without the norm and reduction (own nodes)."""
    layout = "nhwc"

    def __init__(self, layer=None):
        super().__init__()

    def forward(self, x):
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        return torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)


def ShiftedWindowAttention(layer: L.ShiftedWindowAttention) -> nn.Module:  # noqa: N802
    """torchvision's own ShiftedWindowAttention (NHWC), the module swin_t's weights come from."""
    from jaxprune.torch_compat import torchvision
    cls = torchvision().models.swin_transformer.ShiftedWindowAttention
    mod = cls(layer.dim, [layer.window] * 2, [layer.shift] * 2, layer.num_heads)
    mod.layout = "nhwc"
    return mod


def torch_layer(layer: L.Layer, name: str) -> nn.Module:
    """The torch counterpart of one jaxprune layer (weights not loaded yet): the callable
    of this module its kind names in `torch_counterpart`."""
    build = globals().get(type(layer).torch_counterpart)
    if build is None:
        raise UserError(f"to_torch: layer {name!r} is a {type(layer).__name__}, whose torch "
                        f"counterpart {type(layer).torch_counterpart!r} is not defined in "
                        f"converters/torch_layers.py")
    return build(layer)
