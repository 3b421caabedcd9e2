"""`profile(m, input_shape)`: depth, parameters, MACs and (when asked) latency.

* depth: weight layers (`Layer.weight_layers`: convs, linears; a windowed
  attention counts its qkv and output projections) on the longest
  input-to-output path of the graph;
* params: every parameter the model stores, border terms of fused layers
  included (`border_params` says how many of them are that);
* macs: multiply-accumulates per image, as each layer kind declares them
  (`Layer.macs`: convs, linears and attention; normalization, activations,
  pooling and sums count 0); `border_macs` says how many are fused layers'
  border kernels;
* latency (optional): median milliseconds per batch, JAX (jit, eval mode) and
  / or torch eager on `converters.to_torch(m)`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError
from models.layers import FusedConv
from models.net import INPUT, Net

from jaxprune.merging.fold import eval_mode


def input_hw(m: Net, input_shape=None) -> tuple[int, int]:
    """(H, W) from `input_shape` given as (H, W), (H, W, C) or (N, H, W, C); default native."""
    if input_shape is None:
        return tuple(m.spec.input_size)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in (2, 3, 4) or min(shape) < 1:
        raise UserError(f"input_shape {input_shape!r}: expected (H, W), (H, W, C) or "
                        f"(N, H, W, C) with positive sizes")
    if len(shape) >= 3 and shape[-1] != m.spec.in_channels:
        raise UserError(f"input_shape {input_shape!r} has {shape[-1]} channels; "
                        f"{m.spec.arch} takes {m.spec.in_channels} (NHWC order)")
    return shape[-3:-1] if len(shape) >= 3 else shape


def run_nodes(m: Net, env: dict, nodes) -> dict:
    """Execute `nodes` (graph order) of `m` on the tensors in `env`, adding their outputs."""
    inputs = dict(m.graph)
    for n in nodes:
        env[n] = m.layers[n](*(env[i] for i in inputs[n]))
    return env


def tensor_shapes(m: Net, hw: tuple[int, int], batch: int = 1) -> dict[str, tuple]:
    """Shape of every tensor of the graph (eval mode) for an input of size `hw`."""
    x = jax.ShapeDtypeStruct((batch, *hw, m.spec.in_channels), jnp.float32)
    order = [n for n, _ in m.graph]
    with eval_mode(m):
        out = jax.eval_shape(lambda v: run_nodes(m, {INPUT: v}, order), x)
    return {k: tuple(v.shape) for k, v in out.items()}


def smallest_input(m: Net, hw, holds) -> tuple[int, int]:
    """The smallest input (H, W), at most `hw`, from which `holds(shapes, axis)` is true
    along each axis (0: height, 1: width) for the `tensor_shapes` of that input; it must
    hold at `hw` and stay true at larger sizes (tensor sizes grow with the input's). A
    bisection on both axes at once; a size the network refuses or cannot trace counts as
    too small."""
    lo, hi = [1, 1], list(hw)
    while lo != hi:
        mid = tuple((a + b) // 2 for a, b in zip(lo, hi))
        try:
            shapes = tensor_shapes(m, mid)
        except (TypeError, ValueError, UserError):
            shapes = None
        for axis in (0, 1):
            if lo[axis] < hi[axis]:
                if shapes is not None and holds(shapes, axis):
                    hi[axis] = mid[axis]
                else:
                    lo[axis] = mid[axis] + 1
    return tuple(lo)


def depth(m: Net) -> int:
    """Weight layers on the longest input-to-output path."""
    longest = {INPUT: 0}
    for n, inputs in m.graph:
        longest[n] = max(longest[i] for i in inputs) + m.layers[n].weight_layers()
    return longest[m.graph[-1][0]]


def count_params(m: Net) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))


def border_params(m: Net) -> int:
    """Parameters that only exist to keep fused layers exact at the borders."""
    return sum(layer.border_params() for _, layer in m.named_layers()
               if isinstance(layer, FusedConv))


def border_macs(m: Net, shapes: dict) -> int:
    """MACs of the fused layers' border kernels at the tensor `shapes` of one input size."""
    inputs = dict(m.graph)
    return sum(layer.border_macs(*shapes[inputs[n][0]][1:3]) for n, layer in m.named_layers()
               if isinstance(layer, FusedConv))


def macs(m: Net, shapes: dict) -> int:
    """MACs per image at the tensor `shapes` of one input size (`tensor_shapes`)."""
    return sum(m.layers[n].macs([shapes[i] for i in ins], shapes[n]) for n, ins in m.graph)


@dataclasses.dataclass
class Profile(Mapping):
    """Also a read-only mapping of its fields (`dict(p)`, `p["depth"]`)."""
    input_size: tuple[int, int]
    depth: int
    params: int
    border_params: int
    macs: int
    border_macs: int         # of `macs`: the fused layers' border kernels
    latency_ms: dict = dataclasses.field(default_factory=dict)  # "jax@1" -> median ms
    latency_spread_ms: dict = dataclasses.field(default_factory=dict)  # "jax@1" -> (min, max)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __getitem__(self, key):
        return self.as_dict()[key]

    def __iter__(self):
        return iter(f.name for f in dataclasses.fields(self))

    def __len__(self) -> int:
        return len(dataclasses.fields(self))

    def __str__(self) -> str:
        lat = "".join(f", {k} {v:.2f} ms" for k, v in self.latency_ms.items())
        return (f"depth {self.depth}, params {self.params / 1e6:.3f} M, "
                f"MACs {self.macs / 1e6:.1f} M at {self.input_size[0]}x{self.input_size[1]}{lat}")


RUNTIMES = ("jax", "torch")


def profile(m: Net, input_shape=None, *, latency: bool | str | Sequence[str] = False,
            batch: int = 1, rounds: int = 3, repeats: int = 10) -> Profile:
    """Depth, parameters and MACs of `m`; latency in the runtimes asked for.

    `latency`: False, True (= "jax"), "jax", "torch" or a list of them; measured by
    `jaxprune.measure.models.model_latency` (each runtime in fresh processes of its own,
    `rounds` rounds of its default bursts of `repeats` timed calls, median of the burst
    medians and their spread) at `batch`
    images of `input_shape` (default: the native size). In torch, `m` runs as its torch
    original when it is an unmodified architecture, else as its exported `model.pt2`.
    """
    hw = input_hw(m, input_shape)
    runtimes = (() if latency is False else ("jax",) if latency is True
                else (latency,) if isinstance(latency, str) else tuple(latency))
    for r in runtimes:
        if r not in RUNTIMES:
            raise UserError(f"profile: unknown latency runtime {r!r}; use one of {list(RUNTIMES)}")
    median, spread = {}, {}
    if runtimes:
        from jaxprune.measure.models import model_latency
        t = model_latency({"model": m}, hw, batch=batch, runtimes=runtimes, rounds=rounds,
                          repeats=repeats)
        for r in runtimes:
            median[f"{r}@{batch}"] = t[f"model {r}"].median_ms
            spread[f"{r}@{batch}"] = t[f"model {r}"].spread_ms
    shapes = tensor_shapes(m, hw)
    return Profile(tuple(hw), depth(m), count_params(m), border_params(m), macs(m, shapes),
                   border_macs(m, shapes), median, spread)
