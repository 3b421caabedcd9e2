"""A torch module for every jaxprune layer type: the registry `converters.to_torch` uses.

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
from jaxprune.merging.layers import FusedConv
from models import layers as L
from models import swin as S


class _Same(nn.Module):
    layout = "same"


class Conv(nn.Conv2d):
    """nn.Conv2d; an asymmetric or negative (cropping) padding is applied with F.pad first."""
    layout = "nchw"

    def __init__(self, layer: L.Conv):
        pre_pad, conv_pad = _padding(layer.padding)
        super().__init__(layer.cin, layer.cout, layer.kernel_size, layer.stride, conv_pad,
                         groups=layer.groups, bias=layer.bias is not None)
        self.pre_pad = pre_pad

    def forward(self, x):
        return super().forward(F.pad(x, self.pre_pad) if self.pre_pad else x)


def _padding(padding):
    """(F.pad argument or None, conv padding) for jaxprune's ((lo, hi), (lo, hi))."""
    (plo, phi), (qlo, qhi) = padding
    if plo == phi >= 0 and qlo == qhi >= 0:
        return None, (plo, qlo)
    return (qlo, qhi, plo, phi), (0, 0)


class FusedConvT(nn.Module):
    """`jaxprune.merging.FusedConv` in torch (NCHW): base conv + bias (map) + border corrections."""
    layout = "nchw"

    def __init__(self, layer: FusedConv):
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
        self.pre_pad, self.conv_pad = _padding(layer.padding)
        (plo, phi), (qlo, qhi) = layer.border_pad
        self.border_pad = (qlo, qhi, plo, phi)
        self.windows = list(layer.windows())
        self.out_size, self.stride = layer.out_size, layer.stride
        self.groups = layer.groups

    def forward(self, x):
        y = F.conv2d(F.pad(x, self.pre_pad) if self.pre_pad else x, self.weight, None,
                     self.stride, self.conv_pad, groups=self.groups)
        y = y + (self.bias_map if self.bias_map is not None else self.bias[:, None, None])
        if len(self.border):
            xp = F.pad(x, self.border_pad)
            (sh, sw), (ho, wo) = self.stride, self.out_size
            for n, i, j, r0, c0, stride in self.windows:
                k = self.border[n]
                rows = k.shape[2] if i is not None else sh * (ho - 1) + k.shape[2]
                cols = k.shape[3] if j is not None else sw * (wo - 1) + k.shape[3]
                out = F.conv2d(xp[:, :, r0:r0 + rows, c0:c0 + cols], k, None, stride,
                               groups=self.groups)
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


_ACTS = {"relu": F.relu, "relu6": F.relu6, "gelu": F.gelu}  # F.gelu is exact (erf) by default


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


def _window_attention(layer: S.ShiftedWindowAttention) -> nn.Module:
    """torchvision's own ShiftedWindowAttention (NHWC), the module swin_t's weights come from."""
    from jaxprune.torch_compat import torchvision
    cls = torchvision().models.swin_transformer.ShiftedWindowAttention
    mod = cls(layer.dim, [layer.window] * 2, [layer.shift] * 2, layer.num_heads)
    mod.layout = "nhwc"
    return mod


_BUILDERS = {
    L.Conv: Conv, FusedConv: FusedConvT, L.BatchNorm: BatchNorm, L.Act: Act, L.Add: Add,
    L.Linear: Linear, L.LayerNorm: LayerNorm, L.MaxPool: MaxPool,
    L.GlobalAvgPool: GlobalAvgPool, L.AdaptiveAvgPool: AdaptiveAvgPool,
    L.FlattenNCHW: FlattenNCHW, L.Dropout: Identity, S.StochasticDepth: Identity,
    S.PatchMerging: PatchMerging, S.ShiftedWindowAttention: _window_attention,
}


def torch_layer(layer, name: str) -> nn.Module:
    """The torch counterpart of one jaxprune layer (weights not loaded yet)."""
    build = _BUILDERS.get(type(layer))
    if build is None:
        raise UserError(f"to_torch: layer {name!r} is a {type(layer).__name__}, which has no "
                        f"torch counterpart (known: {sorted(c.__name__ for c in _BUILDERS)})")
    return build(layer)
