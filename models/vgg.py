"""VGG-16-BN, torchvision layout.

Layer names are torchvision's module paths: `features.N` runs conv, BN, ReLU
(and a 2x2 max-pool after each stage) with one running index, then `avgpool`,
and `classifier.0` ... `classifier.6` (Linear, ReLU, Dropout, Linear, ReLU,
Dropout, Linear). The 15 sites are the 13 conv ReLUs (`features.2`,
`features.5`, ...) and the 2 classifier ReLUs (`classifier.1`, `classifier.4`).

torchvision's `AdaptiveAvgPool2d((7, 7))` is kept, so the model runs at any
input size like the original: at 224 px the 7x7 map passes through, at 32 px
(CIFAR) the 1x1 map is replicated to 7x7. The flatten before the classifier is
in NCHW order so torch's `classifier.0` weights apply unchanged.
"""
from __future__ import annotations

from flax import nnx

from models.layers import Act, AdaptiveAvgPool, BatchNorm, Conv, Dropout, FlattenNCHW, Linear, MaxPool
from models.layers.initializers import normal, zeros
from models.net import GraphBuilder, ModelSpec, Net
from models.registry import register

# torchvision's configuration "D": output channels per conv, "M" = 2x2 max-pool.
_CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_POOL_HW = (7, 7)
_HIDDEN = 4096


def _conv_indices() -> list[int]:
    """Indices in `features` of the convs of configuration D (torchvision's numbering)."""
    out, i = [], 0
    for v in _CFG_D:
        if v == "M":
            i += 1
        else:
            out.append(i)
            i += 3
    return out


@register("vgg16_bn", sites=15, detect=lambda sd, module: _detect(sd))
def vgg16_bn(num_classes: int = 1000, seed: int = 0, dropout: float = 0.5) -> Net:
    """VGG-16 with BatchNorm, torchvision layout (adaptive 7x7 pool, dropout classifier)."""
    rngs = nnx.Rngs(seed)
    # torchvision's init: Linear N(0, 0.01) with zero bias (convs keep the layer default)
    lin_init = dict(kernel_init=normal(0.01), bias_init=zeros)
    b = GraphBuilder()
    i, cin = 0, 3
    for v in _CFG_D:
        if v == "M":
            b.add(f"features.{i}", MaxPool(2, 2))
            i += 1
            continue
        b.add(f"features.{i}", Conv(cin, v, 3, padding=1, bias=True, rngs=rngs))
        b.add(f"features.{i + 1}", BatchNorm(v))
        b.add(f"features.{i + 2}", Act("relu"))
        i, cin = i + 3, v
    b.add("avgpool", AdaptiveAvgPool(_POOL_HW))
    b.add("flatten", FlattenNCHW())
    b.add("classifier.0", Linear(cin * _POOL_HW[0] * _POOL_HW[1], _HIDDEN, rngs=rngs, **lin_init))
    b.add("classifier.1", Act("relu"))
    b.add("classifier.2", Dropout(dropout, rngs=rngs))
    b.add("classifier.3", Linear(_HIDDEN, _HIDDEN, rngs=rngs, **lin_init))
    b.add("classifier.4", Act("relu"))
    b.add("classifier.5", Dropout(dropout, rngs=rngs))
    b.add("classifier.6", Linear(_HIDDEN, num_classes, rngs=rngs, **lin_init))
    return b.build(ModelSpec("vgg16_bn", num_classes, (("dropout", dropout),), (224, 224)))


def _detect(sd: dict) -> dict | None:
    convs = {int(k.split(".")[1]) for k, v in sd.items()
             if k.startswith("features.") and k.split(".")[1].isdigit()
             and k.endswith(".weight") and len(v.shape) == 4}
    # the conv indices alone tell VGG-16-BN from plain VGG-16 and the other depths
    if convs != set(_conv_indices()) or "classifier.6.weight" not in sd:
        return None
    return {"num_classes": int(sd["classifier.6.weight"].shape[0])}
