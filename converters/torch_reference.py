"""The PyTorch networks jaxprune's models reproduce, built from the same name and options.

    t = build("resnet18_cifar", num_classes=10, width=8)   # torch module, eval mode
    m = converters.from_torch(t, arch="resnet18_cifar")    # the same function in JAX

`build(arch, num_classes, **options)` takes the options of `models.create(arch, ...)`
and returns the torch module whose state dict `converters.from_torch` reads
into exactly that jaxprune model. The parity check (`method: parity`) and the
parity tests both use it, so there is one definition of "the torch original":

| arch | torch original |
|---|---|
| `resnet18` | torchvision `resnet18` (channels scaled by `width`/64 when `width` is not 64) |
| `resnet18_cifar` | the same with `conv1` a 3x3 stride-1 conv (EASIER's CIFAR stem, maxpool kept) |
| `resnet34` | torchvision `resnet34` (channels scaled likewise) |
| `vgg16_bn` | torchvision `vgg16_bn` |
| `mobilenet_v2` | torchvision `mobilenet_v2`, or timm `mobilenetv2_<width*100>` with `layout="timm"` |
| `mobilenet_v2_cifar` | the same with stem and stage-2 stride 1 |
| `efficientnet_lite0` | timm `efficientnet_lite0` |
| `swin_t` | torchvision `SwinTransformer` with `swin_t`'s hyperparameters |
"""
from __future__ import annotations

import inspect

import torch

from jaxprune.errors import UserError, closest
from jaxprune.torch_compat import timm, torchvision

# Parity gates in float32 on CPU (DESIGN.md §4): max |logits difference|.
_TOLERANCE = {"swin_t": 5e-4}
DEFAULT_TOLERANCE = 1e-4


def tolerance(arch: str) -> float:
    """The documented max |Δ logits| between a jaxprune model and its torch original."""
    return _TOLERANCE.get(arch, DEFAULT_TOLERANCE)


def _narrow(module: torch.nn.Module, width: int, base: int = 64) -> torch.nn.Module:
    """Scale every hidden channel count by width/base, in place.

    torchvision's ResNet hard-codes 64-128-256-512 channels; jaxprune's `width`
    option (small test models) scales them all. The image's 3 input channels
    and the classifier's outputs stay as they are.
    """
    def scale(c: int) -> int:
        return c * width // base

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Conv2d):
                cin = child.in_channels if child.in_channels == 3 else scale(child.in_channels)
                new = torch.nn.Conv2d(cin, scale(child.out_channels), child.kernel_size,
                                      child.stride, child.padding, bias=child.bias is not None)
            elif isinstance(child, torch.nn.BatchNorm2d):
                new = torch.nn.BatchNorm2d(scale(child.num_features))
            elif isinstance(child, torch.nn.Linear):
                new = torch.nn.Linear(scale(child.in_features), child.out_features)
            else:
                continue
            setattr(parent, name, new)
    return module


def _resnet(depth: int, num_classes: int, width: int, cifar: bool = False) -> torch.nn.Module:
    if width < 1:
        raise UserError(f"resnet{depth} width must be a positive integer, got {width}")
    t = getattr(torchvision().models, f"resnet{depth}")(num_classes=num_classes)
    if cifar:  # EASIER's CIFAR ResNet-18: 3x3 stride-1 stem, maxpool kept
        t.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    return _narrow(t, width) if width != 64 else t


def resnet18(num_classes: int = 1000, width: int = 64) -> torch.nn.Module:
    return _resnet(18, num_classes, width)


def resnet18_cifar(num_classes: int = 10, width: int = 64) -> torch.nn.Module:
    return _resnet(18, num_classes, width, cifar=True)


def resnet34(num_classes: int = 1000, width: int = 64) -> torch.nn.Module:
    return _resnet(34, num_classes, width)


def vgg16_bn(num_classes: int = 1000, dropout: float = 0.5) -> torch.nn.Module:
    return torchvision().models.vgg16_bn(num_classes=num_classes, dropout=dropout)


def _mobilenet_v2(num_classes: int, width_mult: float, layout: str, dropout: float,
                  cifar: bool) -> torch.nn.Module:
    if layout == "timm":
        name = f"mobilenetv2_{round(width_mult * 100):03d}"
        known = timm().list_models("mobilenetv2_*")
        if name not in known:
            raise UserError(f"timm has no MobileNetV2 of width_mult {width_mult} ({name!r}); "
                            f"timm's are {known}")
        t = timm().create_model(name, num_classes=num_classes, drop_rate=dropout)
        stem, stage2_dw = t.conv_stem, t.blocks[1][0].conv_dw
    elif layout == "torchvision":
        t = torchvision().models.mobilenet_v2(num_classes=num_classes, width_mult=width_mult,
                                              dropout=dropout)
        stem, stage2_dw = t.features[0][0], t.features[2].conv[1][0]
    else:
        raise UserError(f"unknown MobileNetV2 layout {layout!r}; use 'torchvision' or 'timm'")
    if cifar:  # EASIER's CIFAR MobileNetV2 keeps 32 px through stage 2
        stem.stride = (1, 1)
        stage2_dw.stride = (1, 1)
    return t


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, layout: str = "torchvision",
                 dropout: float = 0.2) -> torch.nn.Module:
    return _mobilenet_v2(num_classes, width_mult, layout, dropout, cifar=False)


def mobilenet_v2_cifar(num_classes: int = 10, width_mult: float = 1.0,
                       layout: str = "torchvision", dropout: float = 0.2) -> torch.nn.Module:
    return _mobilenet_v2(num_classes, width_mult, layout, dropout, cifar=True)


def efficientnet_lite0(num_classes: int = 1000, dropout: float = 0.2) -> torch.nn.Module:
    return timm().create_model("efficientnet_lite0", num_classes=num_classes, drop_rate=dropout)


def swin_t(num_classes: int = 1000, window_size: int = 7, stochastic_depth_prob: float = 0.2,
           dropout: float = 0.0) -> torch.nn.Module:
    # torchvision's swin_t() fixes window_size=[7, 7]; its class takes any window.
    return torchvision().models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
        window_size=[window_size, window_size], stochastic_depth_prob=stochastic_depth_prob,
        dropout=dropout, num_classes=num_classes)


BUILDERS = {f.__name__: f for f in (resnet18, resnet18_cifar, resnet34, vgg16_bn, mobilenet_v2,
                                    mobilenet_v2_cifar, efficientnet_lite0, swin_t)}


def build(arch: str, num_classes: int | None = None, seed: int = 0, **options) -> torch.nn.Module:
    """The torch original of `models.create(arch, num_classes, **options)`: fresh
    torch initialisation seeded by `seed`, eval mode. `num_classes=None` takes the
    architecture's default."""
    if arch not in BUILDERS:
        raise UserError(f"no torch reference for model {arch!r}; {closest(arch, BUILDERS)}")
    fn = BUILDERS[arch]
    valid = [p for p in inspect.signature(fn).parameters if p != "num_classes"]
    for key in options:
        if key not in valid:
            raise UserError(f"model {arch!r} has no option {key!r}; valid options: {valid}")
    if num_classes is not None:
        options["num_classes"] = num_classes
    torch.manual_seed(seed)
    return fn(**options).eval()


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, in place; eval mode.

    Fresh BatchNorms are identities (mean 0, var 1, scale 1, bias 0), so a
    converter that dropped or swapped them would still pass a parity check.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                c = mod.num_features
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                mod.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                mod.weight.copy_(torch.rand(c, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return module.eval()
