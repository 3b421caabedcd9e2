"""Swin's attention layers, torchvision's numerics (DESIGN.md §4):
`ShiftedWindowAttention` (windowed multi-head self-attention with a relative
position bias and cyclic shifts) and `PatchMerging` (2x2 space-to-depth).

Numerics that parity depends on: the relative-position index is built as in
torchvision (and is a buffer of the state dict), the shifted-window mask fills
with -100, the cyclic roll comes before and after, windows are padded, the
shift is forced to 0 where the window covers the map, PatchMerging concatenates
[0::2,0::2], [1::2,0::2], [0::2,1::2], [1::2,1::2], and q is scaled by
head_dim**-0.5. Each forward is written to be reproducible step by step in torch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError
from models.layers.base import Layer, set_from_torch
from models.layers.initializers import trunc_normal, zeros
from models.layers.linear import Linear

MASK_FILL = -100.0  # torchvision's value for attention between different shifted regions


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
    torch_counterpart = "ShiftedWindowAttention"
    # torchvision's module chooses its window shift and padding by the map size in Python
    torch_dynamic_size = False

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.window, self.shift = dim, num_heads, window, shift
        init = trunc_normal(0.02)  # torchvision's init for every Linear and the table
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

    def config(self):
        return dict(dim=self.dim, num_heads=self.num_heads, window=self.window, shift=self.shift)

    def macs(self, in_shapes, out_shape):
        _, h, w, c = in_shapes[0]
        ws = self.window
        tokens = (-(-h // ws) * ws) * (-(-w // ws) * ws)  # padded to whole windows
        # qkv and output projections, then q k^T and attn v inside each window
        return tokens * c * 3 * c + tokens * c * c + 2 * tokens * ws * ws * c

    def linear_kind(self):
        return None

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
        set_from_torch(self.relative_position_bias_table, state["relative_position_bias_table"],
                       f"{name}.relative_position_bias_table", (rows, self.num_heads),
                       lambda t: t)


class PatchMerging(Layer):
    """torchvision's `_patch_merging_pad`: (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), 4C).

    Zero-pads an odd H or W at the bottom/right, then concatenates the four
    2x2 phases in torchvision's order [0::2,0::2], [1::2,0::2], [0::2,1::2],
    [1::2,1::2] (the order the reduction weights expect). The PatchMerging
    module's `norm` and `reduction` are the graph's next two nodes.
    """
    torch_counterpart = "PatchMerging"

    def __call__(self, x):
        h, w = x.shape[1:3]
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        parts = (x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2])
        return jnp.concatenate(parts, axis=-1)

    def config(self):
        return {}

    def macs(self, in_shapes, out_shape):
        return 0  # a rearrangement

    def linear_kind(self):
        return None
