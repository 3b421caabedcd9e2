"""MobileNetV2: torchvision's layout, timm's layout, and EASIER's CIFAR variant.

One builder makes all three; only the strides and the layer names differ.

* `mobilenet_v2` (torchvision): `features.0` stem, `features.1` the
  depthwise-separable block (an inverted residual with expansion 1),
  `features.2` ... `features.17` inverted residuals, `features.18` the 1x1
  head, `classifier.1` the linear layer. `width_mult` rounds channels exactly as
  torchvision's `_make_divisible`.
* `layout="timm"`: the same network under timm's names (`conv_stem`, `bn1`,
  `blocks.S.I.conv_pw` ..., `conv_head`, `bn2`, `classifier`), i.e. the state
  dict of `timm.create_model("mobilenetv2_140")` (width 1.4) or
  `"mobilenetv2_100"`, which DepthShrinker starts from.
* `mobilenet_v2_cifar`: stem stride 1 and the first stride-2 block of
  torchvision's table (`[6, 24, 2, 2]`) at stride 1, for 32 px inputs.

35 ReLU6 sites: the stem, the depthwise conv of block 1, the expansion and the
depthwise conv of each of the 16 other blocks, and the head. Torchvision names
them `features.0.act`, `features.1.act_dw`, `features.5.act_expand`,
`features.5.act_dw`, ..., `features.18.act`; timm the module path of the
activation inside its BatchNormAct2d (`bn1.act`, `blocks.1.0.bn2.act`, ...).

The builder takes the table of stages (`build_inverted_residual`), and
`register_family` declares a network's blocks (`ir_blocks`), so other
inverted-residual networks reuse both (`models/efficientnet_lite.py`).
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from jaxprune.errors import UserError
from models.layers import Act, Add, BatchNorm, Conv, Dropout, GlobalAvgPool, Linear
from models.layers.initializers import normal, zeros
from models.net import Block, GraphBuilder, ModelSpec, Net
from models.registry import register

# torchvision's inverted_residual_setting: expansion t, channels c, repeats n, stride s;
# and the depthwise kernel k (3 throughout MobileNetV2)
SETTING = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 32, 3, 2, 3), (6, 64, 4, 2, 3),
           (6, 96, 3, 1, 3), (6, 160, 3, 2, 3), (6, 320, 1, 1, 3))
_STEM, _HEAD = 32, 1280
_LAYOUTS = ("torchvision", "timm")
# Widths tried, in this order, when reading a width from weights: the published
# ones first, then a 0.05 grid. Several widths can round to the same channels;
# they then build the same network, so the first match is as good as any.
_WIDTHS = (1.0, 1.4, 0.75, 0.5, 0.35, 1.3) + tuple(round(0.05 * k, 2) for k in range(1, 81))


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's `_make_divisible`: nearest multiple of `divisor`, never 10 % below `v`."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclasses.dataclass(frozen=True)
class _BlockPlan:
    index: int   # torchvision's features index (1..)
    stage: int   # timm's blocks.S (row of the table)
    pos: int     # timm's blocks.S.I
    cin: int
    cout: int
    expand: int
    stride: int
    kernel: int  # of the depthwise conv


def _plan(setting, width_mult: float, cifar: bool) -> tuple[int, list[_BlockPlan], int]:
    """(stem channels, the blocks, head channels), as torchvision computes them."""
    stem = make_divisible(_STEM * width_mult)
    head = make_divisible(_HEAD * max(1.0, width_mult))
    blocks, cin, index = [], stem, 1
    for stage, (t, c, n, s, k) in enumerate(setting):
        cout = make_divisible(c * width_mult)
        for pos in range(n):
            stride = s if pos == 0 else 1
            if cifar and stage == 1:  # EASIER's CIFAR model keeps 32 px through stage 2
                stride = 1
            blocks.append(_BlockPlan(index, stage, pos, cin, cout, t, stride, k))
            cin, index = cout, index + 1
    return stem, blocks, head


@dataclasses.dataclass(frozen=True)
class _Names:
    """Layer names of one layout. Tuples are (conv, bn, act) or (conv, bn)."""
    stem: tuple[str, str, str]
    head: tuple[str, str, str]
    pool: str
    dropout: str
    classifier: str


def _names(layout: str, n_blocks: int) -> _Names:
    if layout == "timm":
        return _Names(("conv_stem", "bn1", "bn1.act"), ("conv_head", "bn2", "bn2.act"),
                      "global_pool", "drop", "classifier")
    h = f"features.{n_blocks + 1}"
    return _Names(("features.0.0", "features.0.1", "features.0.act"),
                  (f"{h}.0", f"{h}.1", f"{h}.act"), "avgpool", "classifier.0", "classifier.1")


def _block_names(layout: str, blk: _BlockPlan) -> dict:
    """prefix, expand (conv, bn, act) or None, dw (conv, bn, act), project (conv, bn), add."""
    if layout == "timm":
        p = f"blocks.{blk.stage}.{blk.pos}"
        if blk.expand != 1:
            names = dict(expand=(f"{p}.conv_pw", f"{p}.bn1", f"{p}.bn1.act"),
                         dw=(f"{p}.conv_dw", f"{p}.bn2", f"{p}.bn2.act"),
                         project=(f"{p}.conv_pwl", f"{p}.bn3"))
        else:  # timm's DepthwiseSeparableConv
            names = dict(expand=None, dw=(f"{p}.conv_dw", f"{p}.bn1", f"{p}.bn1.act"),
                         project=(f"{p}.conv_pw", f"{p}.bn2"))
    else:
        p = f"features.{blk.index}"
        j = 1 if blk.expand != 1 else 0  # torchvision omits conv.0 when there is no expansion
        names = dict(expand=(f"{p}.conv.0.0", f"{p}.conv.0.1", f"{p}.act_expand") if j else None,
                     dw=(f"{p}.conv.{j}.0", f"{p}.conv.{j}.1", f"{p}.act_dw"),
                     project=(f"{p}.conv.{j + 1}", f"{p}.conv.{j + 2}"))
    return dict(prefix=p, add=f"{p}.add", **names)


def _conv_bn(b: GraphBuilder, names: tuple, cin: int, cout: int, kernel: int, stride: int,
             groups: int, rngs: nnx.Rngs) -> str:
    b.add(names[0], Conv(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups,
                         rngs=rngs))
    out = b.add(names[1], BatchNorm(cout))
    if len(names) == 3:
        out = b.add(names[2], Act("relu6"))
    return out


def build_inverted_residual(arch: str, setting, *, num_classes: int, seed: int,
                            width_mult: float, layout: str, dropout: float, cifar: bool,
                            options: tuple) -> Net:
    """An inverted-residual network from its table of stages `setting` (rows of
    expansion, channels, repeats, stride, depthwise kernel): stem conv 3x3/2, the
    blocks, 1x1 head conv, global pool, dropout, linear classifier; ReLU6 throughout.
    `options` become the spec's options (what `models.create` takes back)."""
    if layout not in _LAYOUTS:
        raise UserError(f"unknown {arch} layout {layout!r}; use one of {list(_LAYOUTS)}")
    if not width_mult > 0:
        raise UserError(f"width_mult must be positive, got {width_mult}")
    rngs = nnx.Rngs(seed)
    stem, blocks, head = _plan(setting, width_mult, cifar)
    names = _names(layout, len(blocks))
    b = GraphBuilder()
    _conv_bn(b, names.stem, 3, stem, 3, 1 if cifar else 2, 1, rngs)
    for blk in blocks:
        bn = _block_names(layout, blk)
        x, hidden = b.last, int(round(blk.cin * blk.expand))
        if bn["expand"]:
            _conv_bn(b, bn["expand"], blk.cin, hidden, 1, 1, 1, rngs)
        _conv_bn(b, bn["dw"], hidden, hidden, blk.kernel, blk.stride, hidden, rngs)
        out = _conv_bn(b, bn["project"], hidden, blk.cout, 1, 1, 1, rngs)
        if blk.stride == 1 and blk.cin == blk.cout:  # torchvision's use_res_connect
            b.add(bn["add"], Add(), inputs=(x, out))
    _conv_bn(b, names.head, blocks[-1].cout, head, 1, 1, 1, rngs)
    b.add(names.pool, GlobalAvgPool())
    b.add(names.dropout, Dropout(dropout, rngs=rngs))
    # torchvision's init of the classifier: N(0, 0.01), zero bias
    b.add(names.classifier, Linear(head, num_classes, rngs=rngs,
                                   kernel_init=normal(0.01), bias_init=zeros))
    return b.build(ModelSpec(arch, num_classes, options, (32, 32) if cifar else (224, 224)))


def plan_matches(sd: dict, setting, width_mult: float, layout: str) -> bool:
    """Whether state dict `sd` has exactly the blocks of `setting` at `width_mult` in
    `layout`: every block's depthwise conv (channels, kernel) and projection (channels),
    the stem and head channels, and no block beyond the table."""
    stem, blocks, head = _plan(setting, width_mult, cifar=False)  # strides change no shape
    names = _names(layout, len(blocks))
    expected = {names.stem[0]: (stem, 3), names.head[0]: (head, 1)}
    for blk in blocks:
        bn = _block_names(layout, blk)
        expected[bn["project"][0]] = (blk.cout, 1)
        expected[bn["dw"][0]] = (int(round(blk.cin * blk.expand)), blk.kernel)
    for name, (channels, kernel) in expected.items():
        w = sd.get(f"{name}.weight")
        if w is None or w.shape[0] != channels or tuple(w.shape[2:]) != (kernel, kernel):
            return False
    beyond = dataclasses.replace(blocks[-1], index=blocks[-1].index + 1, pos=blocks[-1].pos + 1)
    return f"{_block_names(layout, beyond)['project'][0]}.weight" not in sd


def _width_of(sd: dict, layout: str) -> float | None:
    """The width multiplier whose channel plan matches every conv of `sd`, else None."""
    return next((w for w in _WIDTHS if plan_matches(sd, SETTING, w, layout)), None)


def _detect(cifar: bool):
    def detect(sd, module):
        layout = "timm" if "conv_stem.weight" in sd else "torchvision"
        names = _names(layout, sum(row[2] for row in SETTING))
        if f"{names.classifier}.weight" not in sd:
            return None
        width = _width_of(sd, layout)
        if width is None:
            return None
        if module is not None:
            # A state dict cannot tell the CIFAR variant apart; a module's stem stride can.
            stride = tuple(module.get_submodule(names.stem[0]).stride)
            if (stride == (1, 1)) != cifar:
                return None
        return {"num_classes": int(sd[f"{names.classifier}.weight"].shape[0]),
                "width_mult": width, "layout": layout}
    return detect


# arch -> (table of stages, CIFAR strides): what `ir_blocks` rebuilds a model's plan from
_FAMILIES: dict[str, tuple] = {}


def ir_blocks(m: Net) -> list[Block]:
    """The blocks of an inverted-residual network, in order: block 0 is the
    depthwise-separable one (torchvision's InvertedResidual with expansion 1), then the
    inverted residuals."""
    opts = dict(m.spec.options)
    setting, cifar = _FAMILIES[m.spec.arch]
    layout = opts.get("layout", "timm")
    graph = dict(m.graph)
    out = []
    for blk in _plan(setting, opts.get("width_mult", 1.0), cifar)[1]:
        bn = _block_names(layout, blk)
        sites = tuple(p[2] for p in (bn["expand"], bn["dw"]) if p)
        first = (bn["expand"] or bn["dw"])[0]
        add = bn["add"] if bn["add"] in m.layers else None
        out.append(Block(bn["prefix"], sites, add, graph[first][0], add or bn["project"][1]))
    return out


def register_family(arch: str, setting, *, sites: int, detect, cifar: bool = False,
                    auto: bool = True):
    """`models.register` for an inverted-residual network built from `setting`, with
    its blocks declared (`ir_blocks`)."""
    _FAMILIES[arch] = (setting, cifar)
    return register(arch, sites=sites, detect=detect, auto=auto, blocks=ir_blocks)


def _options(dropout: float, layout: str, width_mult: float) -> tuple:
    return (("dropout", dropout), ("layout", layout), ("width_mult", width_mult))


@register_family("mobilenet_v2", SETTING, sites=35, detect=_detect(cifar=False))
def mobilenet_v2(num_classes: int = 1000, seed: int = 0, width_mult: float = 1.0,
                 layout: str = "torchvision", dropout: float = 0.2) -> Net:
    """MobileNetV2, torchvision layout (or timm's names with layout="timm"); width_mult 1.0, 1.4, ..."""
    return build_inverted_residual("mobilenet_v2", SETTING, num_classes=num_classes, seed=seed,
                                   width_mult=width_mult, layout=layout, dropout=dropout,
                                   cifar=False, options=_options(dropout, layout, width_mult))


# Its weights have exactly mobilenet_v2's shapes: only arch= or a torch module's stem stride picks it.
@register_family("mobilenet_v2_cifar", SETTING, sites=35, detect=_detect(cifar=True),
                 cifar=True, auto=False)
def mobilenet_v2_cifar(num_classes: int = 10, seed: int = 0, width_mult: float = 1.0,
                       layout: str = "torchvision", dropout: float = 0.2) -> Net:
    """MobileNetV2 for 32 px inputs (stem and stage-2 stride 1), EASIER's CIFAR model."""
    return build_inverted_residual("mobilenet_v2_cifar", SETTING, num_classes=num_classes,
                                   seed=seed, width_mult=width_mult, layout=layout,
                                   dropout=dropout, cifar=True,
                                   options=_options(dropout, layout, width_mult))
