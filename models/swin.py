"""Swin-T: torchvision's `swin_t` layout as a graph of layers.

Layer names follow torchvision's state dict (`features.1.0.attn`,
`features.2.reduction`). torchvision's Permute modules disappear: the graph is
NHWC throughout, which is the layout torchvision's blocks work in anyway.
Per block the graph is

    norm1 -> attn -> attn_proj_drop -> stochastic_depth1 -> add1 (with the block input)
    norm2 -> mlp.0 -> mlp.gelu -> mlp.2 -> mlp.3 -> mlp.4 -> stochastic_depth2 -> add2

`mlp.gelu` is torchvision's `mlp.1`, the block's one activation site (12 in
all). The MLP stays five separate nodes so a merge pass can fuse `mlp.0` and
`mlp.3` once the GELU is linearized. torchvision applies one StochasticDepth
module twice per block; here each call is its own node, like ResNet's ReLUs.

Numerics that parity depends on (DESIGN.md §4) live in the layer vocabulary's
`ShiftedWindowAttention` and `PatchMerging` (models/layers/attention.py).
"""
from __future__ import annotations

from flax import nnx

from jaxprune.errors import UserError
from models.layers import (Act, Add, Conv, Dropout, GlobalAvgPool, LayerNorm, Linear,
                           PatchMerging, ShiftedWindowAttention, StochasticDepth, trunc_normal,
                           uniform)
from models.layers.initializers import zeros
from models.net import GraphBuilder, ModelSpec, Net
from models.registry import register

EMBED_DIM = 96
PATCH = 4
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (3, 6, 12, 24)
MLP_RATIO = 4


def _block(b: GraphBuilder, p: str, dim: int, heads: int, window: int, shift: int,
           sd_prob: float, dropout: float, rngs: nnx.Rngs) -> str:
    """One SwinTransformerBlock: x + sd(attn(norm1(x))), then + sd(mlp(norm2(.)))."""
    x = b.last
    b.add(f"{p}.norm1", LayerNorm(dim))
    b.add(f"{p}.attn", ShiftedWindowAttention(dim, heads, window, shift, rngs=rngs))
    b.add(f"{p}.attn_proj_drop", Dropout(dropout, rngs=rngs))
    branch = b.add(f"{p}.stochastic_depth1", StochasticDepth(sd_prob, rngs=rngs))
    x = b.add(f"{p}.add1", Add(), inputs=(x, branch))
    b.add(f"{p}.norm2", LayerNorm(dim))
    # SwinTransformer re-initialises every Linear (the MLP's xavier init included).
    init = trunc_normal(0.02)
    b.add(f"{p}.mlp.0", Linear(dim, MLP_RATIO * dim, rngs=rngs, kernel_init=init, bias_init=zeros))
    b.add(f"{p}.mlp.gelu", Act("gelu"))
    b.add(f"{p}.mlp.2", Dropout(dropout, rngs=rngs))
    b.add(f"{p}.mlp.3", Linear(MLP_RATIO * dim, dim, rngs=rngs, kernel_init=init, bias_init=zeros))
    b.add(f"{p}.mlp.4", Dropout(dropout, rngs=rngs))
    branch = b.add(f"{p}.stochastic_depth2", StochasticDepth(sd_prob, rngs=rngs))
    return b.add(f"{p}.add2", Add(), inputs=(x, branch))


def _check_options(window_size, stochastic_depth_prob, dropout) -> None:
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        raise UserError(f"swin_t: window_size must be a positive integer (square windows), "
                        f"got {window_size!r}")
    if not 0.0 <= stochastic_depth_prob <= 1.0:
        raise UserError(f"swin_t: stochastic_depth_prob must be in [0, 1], got {stochastic_depth_prob}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"swin_t: dropout must be in [0, 1), got {dropout}")


def _detect(sd, module):
    del module  # the state dict carries everything the builder needs
    keys = ("features.0.0.weight", "features.1.0.attn.relative_position_bias_table", "head.weight")
    if any(k not in sd for k in keys):
        return None
    if tuple(sd["features.0.0.weight"].shape) != (EMBED_DIM, 3, PATCH, PATCH):
        return None  # another embedding width or patch size: swin_b, swin_s-like variants
    for stage, depth in zip((1, 3, 5, 7), DEPTHS):  # swin_s/b have 18 blocks in stage 3
        if (f"features.{stage}.{depth - 1}.norm1.weight" not in sd
                or f"features.{stage}.{depth}.norm1.weight" in sd):
            return None
    rows = int(sd["features.1.0.attn.relative_position_bias_table"].shape[0])
    side = int(round(rows ** 0.5))
    if side * side != rows or side % 2 == 0:
        raise UserError(f"swin_t weights with a relative position table of {rows} rows: only "
                        f"square windows ((2w-1)**2 rows) are supported")
    return {"num_classes": int(sd["head.weight"].shape[0]), "window_size": (side + 1) // 2}


@register("swin_t", sites=12, detect=_detect)
def swin_t(num_classes: int = 1000, seed: int = 0, window_size: int = 7,
           stochastic_depth_prob: float = 0.2, dropout: float = 0.0) -> Net:
    """Swin-T, torchvision layout (patch 4, dim 96, depths 2-2-6-2, heads 3-6-12-24)."""
    _check_options(window_size, stochastic_depth_prob, dropout)
    rngs = nnx.Rngs(seed)
    b = GraphBuilder()
    fan_in = 3 * PATCH * PATCH
    embed = Conv(3, EMBED_DIM, PATCH, stride=PATCH, bias=True, rngs=rngs,
                 kernel_init=uniform(fan_in ** -0.5))  # torch Conv2d's default init
    embed.bias.value = uniform(fan_in ** -0.5)(rngs.params(), (EMBED_DIM,))
    b.add("features.0.0", embed)
    b.add("features.0.2", LayerNorm(EMBED_DIM))
    total, block_id = sum(DEPTHS), 0
    for i, (depth, heads) in enumerate(zip(DEPTHS, NUM_HEADS)):
        dim = EMBED_DIM * 2 ** i
        stage = 2 * i + 1
        for j in range(depth):
            # torchvision's linear ramp of the drop probability over all blocks
            sd_prob = stochastic_depth_prob * block_id / (total - 1)
            shift = 0 if j % 2 == 0 else window_size // 2
            _block(b, f"features.{stage}.{j}", dim, heads, window_size, shift, sd_prob,
                   dropout, rngs)
            block_id += 1
        if i < len(DEPTHS) - 1:
            b.add(f"features.{stage + 1}.merge", PatchMerging())
            b.add(f"features.{stage + 1}.norm", LayerNorm(4 * dim))
            b.add(f"features.{stage + 1}.reduction",
                  Linear(4 * dim, 2 * dim, bias=False, rngs=rngs, kernel_init=trunc_normal(0.02)))
    dim = EMBED_DIM * 2 ** (len(DEPTHS) - 1)
    b.add("norm", LayerNorm(dim))
    b.add("avgpool", GlobalAvgPool())
    b.add("head", Linear(dim, num_classes, rngs=rngs, kernel_init=trunc_normal(0.02),
                         bias_init=zeros))
    options = (("dropout", dropout), ("stochastic_depth_prob", stochastic_depth_prob),
               ("window_size", window_size))
    return b.build(ModelSpec("swin_t", num_classes, options, (224, 224)))
