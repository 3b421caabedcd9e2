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
    keep). A larger symmetric padding computes a few extra output rows, sliced off."""
    pads, starts = [], []
    for (lo, hi), s in zip(padding, stride):
        if lo >= hi:
            pads.append(lo)
            starts.append(0)
        elif (hi - lo) % s == 0:
            pads.append(hi)
            starts.append((hi - lo) // s)
        else:
            (plo, phi), (qlo, qhi) = padding
            return (qlo, qhi, plo, phi), (0, 0), (0, 0)
    return None, tuple(pads), tuple(starts)


def _conv(x, weight, bias, stride, padding, groups, plan, dilation=(1, 1)):
    """F.conv2d with jaxprune's padding (output cropped to the exact size)."""
    pre_pad, conv_pad, (r0, c0) = plan
    if pre_pad is not None:
        return F.conv2d(F.pad(x, pre_pad), weight, bias, stride, 0, dilation, groups)
    y = F.conv2d(x, weight, bias, stride, conv_pad, dilation, groups)
    (plo, phi), (qlo, qhi) = padding
    (dh, dw), (kh, kw) = dilation, weight.shape[2:]
    ho = (x.shape[2] + plo + phi - dh * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + qlo + qhi - dw * (kw - 1) - 1) // stride[1] + 1
    if (r0, c0, ho, wo) != (0, 0, y.shape[2], y.shape[3]):
        y = y[:, :, r0:r0 + ho, c0:c0 + wo]
    return y


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


def _window_conv(x, k, r0: int, c0: int, rows: int, cols: int, stride, groups: int):
    """A conv of kernel `k` over input rows [r0, r0+rows) x cols [c0, c0+cols) of `x` (zero
    outside), as one einsum over unfolded patches: border corrections are a few output
    rows, far too small for F.conv2d's per-call cost."""
    h, w = x.shape[2:]
    a, b, c, d = max(r0, 0), min(r0 + rows, h), max(c0, 0), min(c0 + cols, w)
    win = x[:, :, a:b, c:d]
    pad = (c - c0, c0 + cols - d, a - r0, r0 + rows - b)
    if any(pad):
        win = F.pad(win, pad)
    o, ci, kh, kw = k.shape
    p = win.unfold(2, kh, stride[0]).unfold(3, kw, stride[1])   # N, C, oh, ow, kh, kw
    n, _, oh, ow = p.shape[:4]
    p = p.reshape(n, groups, ci, oh, ow, kh, kw)
    out = torch.einsum("ngchwab,gocab->ngohw", p, k.reshape(groups, o // groups, ci, kh, kw))
    return out.reshape(n, o, oh, ow)


class FusedConv(nn.Module):
    """`models.layers.FusedConv` in torch (NCHW): base conv + bias (map) + border corrections."""
    layout = "nchw"

    def __init__(self, layer: L.FusedConv):
        super().__init__()
        kh, kw = layer.kernel_size
        ho, wo = layer.out_size
        self.weight = nn.Parameter(torch.zeros(layer.cout, layer.cin // layer.groups, kh, kw))
        if layer.bias_map is not None:
            self.bias, self.bias_map = None, nn.Parameter(torch.zeros(layer.cout, ho, wo))
        else:
            self.bias, self.bias_map = nn.Parameter(torch.zeros(layer.cout)), None
        self.border = nn.ParameterList(
            [nn.Parameter(torch.zeros(tuple(k.value.shape[i] for i in (3, 2, 0, 1))))
             for k in layer.border])
        self.jax_padding, self.stride, self.groups = layer.padding, layer.stride, layer.groups
        self.plan = _conv_plan(layer.padding, layer.stride)
        (plo, _), (qlo, _) = layer.border_pad
        # correction windows in unpadded input coordinates
        self.windows = [(n, i, j, r0 - plo, c0 - qlo, stride)
                        for n, i, j, r0, c0, stride in layer.windows()]
        self.out_size = layer.out_size

    def forward(self, x):
        y = _conv(x, self.weight, self.bias, self.stride, self.jax_padding, self.groups,
                  self.plan)
        if self.bias_map is not None:
            y = y + self.bias_map
        (sh, sw), (ho, wo) = self.stride, self.out_size
        for n, i, j, r0, c0, stride in self.windows:
            k = self.border[n]
            rows = k.shape[2] if i is not None else sh * (ho - 1) + k.shape[2]
            cols = k.shape[3] if j is not None else sw * (wo - 1) + k.shape[3]
            out = _window_conv(x, k, r0, c0, rows, cols, stride, self.groups)
            y[:, :, slice(None) if i is None else slice(i, i + 1),
              slice(None) if j is None else slice(j, j + 1)] += out
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
