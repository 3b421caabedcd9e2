"""EfficientNet-Lite0 in timm's layout (`timm.create_model("efficientnet_lite0")`),
DepthShrinker's second model.

The Lite variants drop EfficientNet's squeeze-excitation and swish: what is left
is an inverted-residual network with ReLU6, 5x5 depthwise convs in three stages
and a fixed 32-channel stem and 1280-channel head, i.e. MobileNetV2's builder
with another table of stages. Layer and site names are timm's: `conv_stem`,
`bn1.act`, `blocks.S.I.conv_pw` / `conv_dw` / `conv_pwl` with sites
`blocks.S.I.bn1.act` (expansion) and `blocks.S.I.bn2.act` (depthwise),
`conv_head`, `bn2.act`, `classifier`.

33 ReLU6 sites: the stem, the depthwise-separable block's, two per each of the
15 inverted residuals, and the head.
"""
from __future__ import annotations

from models.mobilenet_v2 import build_inverted_residual, plan_matches, register_family
from models.net import Net

# timm's efficientnet_lite arch_def: expansion, channels, repeats, stride, depthwise kernel
SETTING = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
           (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3))


def _detect(sd, module):
    del module  # the depthwise kernels and channels tell it apart
    if "classifier.weight" not in sd or not plan_matches(sd, SETTING, 1.0, "timm"):
        return None
    return {"num_classes": int(sd["classifier.weight"].shape[0])}


@register_family("efficientnet_lite0", SETTING, sites=33, detect=_detect)
def efficientnet_lite0(num_classes: int = 1000, seed: int = 0, dropout: float = 0.2) -> Net:
    """EfficientNet-Lite0, timm layout (ReLU6, no squeeze-excitation), 224 px."""
    return build_inverted_residual("efficientnet_lite0", SETTING, num_classes=num_classes,
                                   seed=seed, width_mult=1.0, layout="timm", dropout=dropout,
                                   cifar=False, options=(("dropout", dropout),))
