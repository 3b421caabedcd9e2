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

Numerics that parity depends on (DESIGN.md §4) live in `ShiftedWindowAttention`
and `PatchMerging` below; each forward is written to be reproducible step by
step in torch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError
from models.layers import (Act, Add, Conv, Dropout, GlobalAvgPool, Layer, LayerNorm, Linear,
                           _set)
from models.net import GraphBuilder, ModelSpec, Net
from models.registry import register

EMBED_DIM = 96
PATCH = 4
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (3, 6, 12, 24)
MLP_RATIO = 4
MASK_FILL = -100.0  # torchvision's value for attention between different shifted regions


def _trunc_normal(std: float):
    """torch's `trunc_normal_(std=std)`: cut at +-2 absolute (not +-2 std), no rescaling."""
    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)
    return init


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


@functools.cache
def relative_position_index(window: int) -> np.ndarray:
    """torchvision's `relative_position_index` buffer, (window**4,) int64.

    Entry `i * N + j` (N = window**2 tokens, row-major) indexes the bias table
    row for the offset between tokens i and j: `(dh + w - 1) * (2w - 1) + (dw + w - 1)`.
    """
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)                                     # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)  # N, N, 2
    rel = rel + (window - 1)
    rel[:, :, 0] *= 2 * window - 1
    out = rel.sum(-1).reshape(-1).astype(np.int64)
    out.setflags(write=False)  # cached and shared: never modified in place
    return out


@functools.cache
def shift_mask(pad_h: int, pad_w: int, window: int, shift_h: int, shift_w: int) -> np.ndarray:
    """The additive attention mask of shifted windows, (num_windows, N, N) float32.

    Built exactly as torchvision does, slices included: with one shift forced
    to 0 the slice `[-window:-0]` is empty and `[-0:]` covers the whole axis,
    so only the other axis splits into regions. Tokens of different regions
    get -100, the rest 0.
    """
    label = np.zeros((pad_h, pad_w), np.float32)
    h_slices = ((0, -window), (-window, -shift_h), (-shift_h, None))
    w_slices = ((0, -window), (-window, -shift_w), (-shift_w, None))
    count = 0
    for h0, h1 in h_slices:
        for w0, w1 in w_slices:
            label[h0:h1, w0:w1] = count
            count += 1
    n_h, n_w = pad_h // window, pad_w // window
    label = label.reshape(n_h, window, n_w, window).transpose(0, 2, 1, 3)
    label = label.reshape(n_h * n_w, window * window)
    diff = label[:, None, :] - label[:, :, None]
    out = np.where(diff != 0, MASK_FILL, 0.0).astype(np.float32)
    out.setflags(write=False)
    return out


class ShiftedWindowAttention(Layer):
    """torchvision's `ShiftedWindowAttention` (Swin v1) on an NHWC map.

    Forward, as `torchvision.models.swin_transformer.shifted_window_attention`:
    zero-pad H, W (bottom/right) to multiples of the window; force a shift to 0
    along an axis the window covers; roll by -shift; split into windows of
    N = window**2 tokens; qkv linear; q * head_dim**-0.5; q k^T + relative
    position bias (table rows picked by `relative_position_index`); + the
    shift mask when shifting; softmax; times v; proj linear; undo the windows,
    roll back by +shift, crop the padding.

    Torch state: `qkv.{weight,bias}`, `proj.{weight,bias}`,
    `relative_position_bias_table` ((2w-1)**2, heads) and the buffer
    `relative_position_index`, which is exported and, on import, must equal
    the index torchvision builds (a different one means other weights).
    The output dropout (torch's `dropout` argument) is the graph's next node,
    `attn_proj_drop`: elementwise and i.i.d., so applying it after the window
    reversal instead of before is the same distribution.
    """

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.window, self.shift = dim, num_heads, window, shift
        init = _trunc_normal(0.02)  # torchvision's init for every Linear and the table
        zeros = jax.nn.initializers.zeros
        self.qkv = Linear(dim, 3 * dim, rngs=rngs, kernel_init=init, bias_init=zeros)
        self.proj = Linear(dim, dim, rngs=rngs, kernel_init=init, bias_init=zeros)
        self.relative_position_bias_table = nnx.Param(
            init(rngs.params(), ((2 * window - 1) ** 2, num_heads), jnp.float32))

    def relative_position_bias(self):
        """(heads, N, N): the table gathered through the index."""
        n = self.window * self.window
        bias = self.relative_position_bias_table.value[relative_position_index(self.window)]
        return bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)

    def __call__(self, x):
        b, h, w, c = x.shape
        ws, heads = self.window, self.num_heads
        x = jnp.pad(x, ((0, 0), (0, (-h) % ws), (0, (-w) % ws), (0, 0)))
        ph, pw = x.shape[1:3]
        # A window covering the whole (padded) axis has nothing to shift across.
        sh = self.shift if ws < ph else 0
        sw = self.shift if ws < pw else 0
        shifted = sh + sw > 0
        if shifted:
            x = jnp.roll(x, (-sh, -sw), axis=(1, 2))
        nh, nw = ph // ws, pw // ws
        n = ws * ws
        x = x.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, c)
        qkv = self.qkv(x).reshape(b * nh * nw, n, 3, heads, c // heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * (c // heads) ** -0.5
        attn = q @ jnp.swapaxes(k, -2, -1) + self.relative_position_bias()
        if shifted:
            mask = jnp.asarray(shift_mask(ph, pw, ws, sh, sw))  # (windows, N, N)
            attn = attn.reshape(b, nh * nw, heads, n, n) + mask[None, :, None]
            attn = attn.reshape(b * nh * nw, heads, n, n)
        attn = jax.nn.softmax(attn, axis=-1)
        x = jnp.swapaxes(attn @ v, 1, 2).reshape(b * nh * nw, n, c)
        x = self.proj(x)
        x = x.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
        if shifted:
            x = jnp.roll(x, (sh, sw), axis=(1, 2))
        return x[:, :h, :w, :]

    def torch_state(self):
        out = {f"qkv.{k}": v for k, v in self.qkv.torch_state().items()}
        out.update({f"proj.{k}": v for k, v in self.proj.torch_state().items()})
        out["relative_position_bias_table"] = np.asarray(self.relative_position_bias_table.value)
        out["relative_position_index"] = relative_position_index(self.window).copy()
        return out

    def load_torch_state(self, state, name):
        key = f"{name}.relative_position_index"
        index = np.asarray(state["relative_position_index"])
        expected = relative_position_index(self.window)
        if index.shape != expected.shape or not np.array_equal(index, expected):
            raise UserError(
                f"'{key}' differs from the index torchvision builds for a {self.window}x"
                f"{self.window} window: these weights come from a modified or different model "
                f"(another window_size?); re-export them from torchvision's swin_t")
        for sub, layer in (("qkv", self.qkv), ("proj", self.proj)):
            layer.load_torch_state({k[len(sub) + 1:]: v for k, v in state.items()
                                    if k.startswith(sub + ".")}, f"{name}.{sub}")
        rows = (2 * self.window - 1) ** 2
        _set(self.relative_position_bias_table, state["relative_position_bias_table"],
             f"{name}.relative_position_bias_table", (rows, self.num_heads), lambda t: t)


class PatchMerging(Layer):
    """torchvision's `_patch_merging_pad`: (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), 4C).

    Zero-pads an odd H or W at the bottom/right, then concatenates the four
    2x2 phases in torchvision's order [0::2,0::2], [1::2,0::2], [0::2,1::2],
    [1::2,1::2] (the order the reduction weights expect). The PatchMerging
    module's `norm` and `reduction` are the graph's next two nodes.
    """

    def __call__(self, x):
        h, w = x.shape[1:3]
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        parts = (x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2])
        return jnp.concatenate(parts, axis=-1)


class StochasticDepth(Layer):
    """torchvision's `StochasticDepth(p, "row")`: drops a residual branch per sample.

    Train mode: each sample's input is zeroed with probability p, kept and
    scaled by 1/(1-p) otherwise. Identity in eval mode (`deterministic=True`,
    set by `model.eval()`) and when p == 0.
    """

    def __init__(self, p: float, *, rngs: nnx.Rngs):
        if not 0.0 <= p <= 1.0:
            raise UserError(f"stochastic depth probability must be in [0, 1], got {p}")
        self.p = p
        self.deterministic = False
        self.rngs = rngs.fork() if hasattr(rngs, "fork") else rngs

    def __call__(self, x):
        if self.deterministic or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        if keep == 0.0:
            return jnp.zeros_like(x)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        noise = jax.random.bernoulli(self.rngs.dropout(), keep, shape).astype(x.dtype)
        return x * (noise / keep)


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
    init, zeros = _trunc_normal(0.02), jax.nn.initializers.zeros
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
                 kernel_init=_uniform(fan_in ** -0.5))  # torch Conv2d's default init
    embed.bias.value = _uniform(fan_in ** -0.5)(rngs.params(), (EMBED_DIM,))
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
                  Linear(4 * dim, 2 * dim, bias=False, rngs=rngs, kernel_init=_trunc_normal(0.02)))
    dim = EMBED_DIM * 2 ** (len(DEPTHS) - 1)
    b.add("norm", LayerNorm(dim))
    b.add("avgpool", GlobalAvgPool())
    b.add("head", Linear(dim, num_classes, rngs=rngs, kernel_init=_trunc_normal(0.02),
                         bias_init=jax.nn.initializers.zeros))
    options = (("dropout", dropout), ("stochastic_depth_prob", stochastic_depth_prob),
               ("window_size", window_size))
    return b.build(ModelSpec("swin_t", num_classes, options, (224, 224)))
