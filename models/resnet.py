"""ResNet-18 and ResNet-34: torchvision's layout, and EASIER's CIFAR variant of ResNet-18.

Both are BasicBlock ResNets (two 3x3 convs per block), [2, 2, 2, 2] and [3, 4, 6, 3]
blocks per stage. Layer names follow torchvision's state dict (`layer2.0.downsample.0`).
torchvision reuses one ReLU module twice per block; here each call is its own
site (`relu1` mid-block, `relu2` after the residual add), as the EASIER paper
counts them: stem + 2 per block, 17 sites for ResNet-18 and 33 for ResNet-34.
"""
from __future__ import annotations

from flax import nnx

from models.layers import Act, Add, BatchNorm, Conv, GlobalAvgPool, Linear, MaxPool
from models.net import GraphBuilder, ModelSpec, Net
from models.registry import register


def _basic_block(b: GraphBuilder, p: str, cin: int, cout: int, stride: int, rngs: nnx.Rngs) -> str:
    x = b.last
    b.add(f"{p}.conv1", Conv(cin, cout, 3, stride=stride, padding=1, rngs=rngs))
    b.add(f"{p}.bn1", BatchNorm(cout))
    b.add(f"{p}.relu1", Act("relu"))
    b.add(f"{p}.conv2", Conv(cout, cout, 3, padding=1, rngs=rngs))
    main = b.add(f"{p}.bn2", BatchNorm(cout))
    shortcut = x
    if stride != 1 or cin != cout:
        b.add(f"{p}.downsample.0", Conv(cin, cout, 1, stride=stride, rngs=rngs), inputs=x)
        shortcut = b.add(f"{p}.downsample.1", BatchNorm(cout))
    b.add(f"{p}.add", Add(), inputs=(main, shortcut))
    return b.add(f"{p}.relu2", Act("relu"))


RESNET18, RESNET34 = (2, 2, 2, 2), (3, 4, 6, 3)  # BasicBlocks per stage


def _resnet(arch: str, depths: tuple[int, ...], num_classes: int, seed: int, width: int,
            cifar_stem: bool) -> Net:
    rngs = nnx.Rngs(seed)
    b = GraphBuilder()
    if cifar_stem:
        b.add("conv1", Conv(3, width, 3, stride=1, padding=1, rngs=rngs))
    else:
        b.add("conv1", Conv(3, width, 7, stride=2, padding=3, rngs=rngs))
    b.add("bn1", BatchNorm(width))
    b.add("relu", Act("relu"))
    b.add("maxpool", MaxPool(3, 2, 1))  # kept in the CIFAR variant too (EASIER's reference)
    cin = width
    for stage, mult in enumerate((1, 2, 4, 8), start=1):
        cout = width * mult
        for block in range(depths[stage - 1]):
            stride = 2 if (stage > 1 and block == 0) else 1
            _basic_block(b, f"layer{stage}.{block}", cin, cout, stride, rngs)
            cin = cout
    b.add("avgpool", GlobalAvgPool())
    b.add("fc", Linear(cin, num_classes, rngs=rngs))
    size = (32, 32) if cifar_stem else (224, 224)
    return b.build(ModelSpec(arch, num_classes, (("width", width),), size))


def _detect(depths: tuple[int, ...], cifar: bool):
    def detect(sd, module):
        del module  # the stem kernel tells the CIFAR variant apart
        w = sd.get("conv1.weight")
        if w is None or "fc.weight" not in sd or "layer1.0.conv3.weight" in sd:
            return None  # not a ResNet, or a bottleneck one (ResNet-50 and deeper)
        for stage, n in enumerate(depths, start=1):  # exactly n blocks in each stage
            if (f"layer{stage}.{n - 1}.conv2.weight" not in sd
                    or f"layer{stage}.{n}.conv1.weight" in sd):
                return None
        if tuple(w.shape[2:]) != ((3, 3) if cifar else (7, 7)):
            return None
        return {"num_classes": int(sd["fc.weight"].shape[0]), "width": int(w.shape[0])}
    return detect


@register("resnet18_cifar", sites=17, detect=_detect(RESNET18, cifar=True))
def resnet18_cifar(num_classes: int = 10, seed: int = 0, width: int = 64) -> Net:
    """ResNet-18 for 32 px inputs (3x3 stride-1 stem, maxpool kept), EASIER's CIFAR model."""
    return _resnet("resnet18_cifar", RESNET18, num_classes, seed, width, cifar_stem=True)


@register("resnet18", sites=17, detect=_detect(RESNET18, cifar=False))
def resnet18(num_classes: int = 1000, seed: int = 0, width: int = 64) -> Net:
    """ResNet-18, torchvision layout (7x7/2 stem + maxpool)."""
    return _resnet("resnet18", RESNET18, num_classes, seed, width, cifar_stem=False)


@register("resnet34", sites=33, detect=_detect(RESNET34, cifar=False))
def resnet34(num_classes: int = 1000, seed: int = 0, width: int = 64) -> Net:
    """ResNet-34, torchvision layout (7x7/2 stem + maxpool, [3, 4, 6, 3] BasicBlocks)."""
    return _resnet("resnet34", RESNET34, num_classes, seed, width, cifar_stem=False)
