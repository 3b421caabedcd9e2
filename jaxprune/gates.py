"""DepthShrinker's gates, its keep rule and its cost tables (DESIGN.md §6).

A *group* is one gate of DepthShrinker: the stem's activation, the
depthwise-separable block's, one shared gate per inverted residual (both its
ReLU6), the head's; N = 19 on MobileNetV2. Each gate has a raw score `s`
(initialised at 0) that measures how much its activations may be identities:

    c = clamp(s, 0, 1)                       # torch.clamp: gradient 1 inside AND on the bounds
    keep = 1 for the k = floor(N * ratio) smallest scores, else 0
    site mask = keep - (c - stop_gradient(c))  # value: keep; gradient: -dc/ds

so `y = x + mask * (relu6(x) - x) = relu6(x) + (x - relu6(x)) * m` with
`m = (1 - keep) + c - stop_gradient(c)`, the released code's hard gate.

Cost tables give each gate `Δ = before - after`, what removing it saves:
`given` (the seed's LAT_BEFORE / LAT_AFTER, ms on a V100), `measured` (this
device: each group's layers timed unfused with their activations, then with
them removed and fused, through `jaxprune.merge` and `jaxprune.profile`) or
`relu` (private inference, where every ReLU is an expensive protocol step: the
thousands of ReLUs per image the gate removes). The regularizer is
`λ Σ Δ_k (1 - s_k)` ("reduce": pushes the scores of the gates that save most
up, towards removal) or the released `λ Σ Δ_k s_k` ("keep", which does the
opposite).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError
from jaxprune.merging.profiling import tensor_shapes
from models.mobilenet_v2 import depthshrinker_groups, ir_blocks
from models.net import INPUT, ModelSpec, Net

# The released search logs keep-lists for these kept fractions.
RATIOS = (0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
COST_KINDS = ("given", "measured", "relu")
COST_SIGNS = ("reduce", "keep")

# The seed config's tables for MobileNetV2-1.4 (ms per candidate, V100).
LAT_BEFORE = (0, 56.97, 138.79, 82.45, 47.03, 34.51, 34.51, 21.19, 17.91, 17.91, 17.91, 20.75,
              31.27, 31.27, 16.67, 14.21, 14.21, 18.77, 0)
LAT_AFTER = (0, 41.78, 5.45, 6.68, 3.23, 4.12, 4.12, 2.38, 2.72, 2.72, 2.72, 3.75, 5.04, 5.04,
             3.44, 2.8, 2.8, 4.38, 0)


# -- gate math (traced) ---------------------------------------------------------------------

def clamp01(s):
    """torch.clamp(s, 0, 1) with torch's gradient: 1 where 0 <= s <= 1 (bounds included),
    0 outside. (`jnp.clip` gives 0.5 on a bound, which would halve the first step from
    the initial s = 0.)"""
    inside = (s >= 0) & (s <= 1)
    return jnp.where(inside, s, jax.lax.stop_gradient(jnp.clip(s, 0.0, 1.0)))


def keep_count(n: int, ratio: float) -> int:
    """k = floor(N * ratio), the released code's int(N * ratio)."""
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"the kept fraction of gates must be in [0, 1], got {ratio}")
    return int(math.floor(n * ratio))


def keep_smallest(scores, k: int):
    """1.0 for the k smallest scores, 0.0 for the rest; ties go to the earlier gate
    (stable order). Works traced and on NumPy arrays."""
    order = jnp.argsort(scores, stable=True)
    ranks = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.shape[0]))
    return (ranks < k).astype(jnp.float32)


def gate_masks(scores, keep):
    """Per-gate site masks (1 = nonlinear): value `keep`, gradient `-dc/ds`."""
    c = clamp01(scores)
    return keep - (c - jax.lax.stop_gradient(c))


def gumbel(key, shape):
    """Standard Gumbel noise (exploration: the search ranks `s + scale * G`)."""
    return jax.random.gumbel(key, shape, jnp.float32)


def cost_penalty(scores, delta, sign: str):
    """Σ Δ_k (1 - s_k) for "reduce" (latency-reducing), Σ Δ_k s_k for "keep" (as released)."""
    if sign == "reduce":
        return jnp.sum(delta * (1.0 - scores))
    if sign == "keep":
        return jnp.sum(delta * scores)
    raise UserError(f"cost sign must be one of {list(COST_SIGNS)}, got {sign!r}")


def keep_lists(scores: Sequence[float], ratios: Sequence[float] = RATIOS) -> dict[str, list[int]]:
    """{ratio: keep-list} from final scores: 1 for the floor(N * ratio) smallest."""
    s = np.asarray(scores, np.float32)
    return {f"{r:g}": [int(v) for v in np.asarray(keep_smallest(s, keep_count(len(s), r)))]
            for r in ratios}


# -- groups of a model ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Group:
    """One gate: its sites, the layers it lets fuse, and where a removed block's ReLU6 goes."""
    index: int
    sites: tuple[str, ...]
    nodes: tuple[str, ...]   # the graph region (stem, block or head) in graph order
    input: str               # the tensor that feeds the region
    final: str | None        # an inverted residual's output (after its add); None otherwise


def groups(m: Net) -> list[Group]:
    """DepthShrinker's N = 19 gates of a MobileNetV2 (`models.mobilenet_v2`)."""
    site_groups = depthshrinker_groups(m)
    blocks = ir_blocks(m)
    order = [n for n, _ in m.graph]
    pos = {n: i for i, n in enumerate(order)}
    head_act = site_groups[-1][0]
    spans = ([(INPUT, blocks[0].input)] + [(b.input, b.output) for b in blocks]
             + [(blocks[-1].output, head_act)])
    out = []
    for k, (sites, (src, end)) in enumerate(zip(site_groups, spans)):
        start = pos[src] + 1 if src != INPUT else 0
        final = blocks[k - 1].output if 2 <= k <= len(blocks) else None  # not the DS block
        out.append(Group(k, tuple(sites), tuple(order[start:pos[end] + 1]), src, final))
    return out


def final_act_name(m: Net, g: Group) -> str:
    """The name of the ReLU6 a removed inverted residual gets after its output."""
    return f"{ir_blocks(m)[g.index - 1].prefix}.final_act"


def set_group_masks(m: Net, gs: Sequence[Group], values) -> None:
    """Write one mask value per group into all its sites (traced or not)."""
    for g in gs:
        for s in g.sites:
            var = m.layers[s].mask
            var.set_value(jnp.broadcast_to(values[g.index], var.get_value().shape))


def parse_keep_list(values: Sequence, n: int, what: str) -> np.ndarray:
    """A keep-list (1 keep, 0 remove) as float32, or a UserError naming `what`."""
    arr = np.asarray(values, np.float64)
    if arr.shape != (n,) or not np.isin(arr, (0, 1)).all():
        raise UserError(f"{what} must be {n} values, each 0 (remove) or 1 (keep); got {list(values)}")
    return arr.astype(np.float32)


# -- cost tables ----------------------------------------------------------------------------

def relu_counts(m: Net, hw: tuple[int, int], names: Sequence[str] | None = None) -> dict[str, int]:
    """Activations per image at each site (its pre-activation's size at input `hw`)."""
    shapes = tensor_shapes(m, tuple(hw))
    inputs = dict(m.graph)
    names = m.sites() if names is None else names
    return {n: int(np.prod(shapes[inputs[n][0]][1:])) for n in names}


def region_net(m: Net, g: Group, shapes: dict[str, tuple]) -> Net:
    """The layers of group `g` as a model of their own (copies), input = the region's input."""
    inputs = dict(m.graph)
    layers = {n: nnx.clone(m.layers[n]) for n in g.nodes}
    graph = tuple((n, tuple(INPUT if i == g.input else i for i in inputs[n])) for n in g.nodes)
    _, h, w, c = shapes[g.input]
    spec = ModelSpec(m.spec.arch, m.spec.num_classes, m.spec.options, (h, w), c)
    return Net(layers, graph, spec)


@dataclasses.dataclass
class CostTable:
    kind: str
    unit: str
    before: list[float]
    after: list[float]

    @property
    def delta(self) -> list[float]:
        return [b - a for b, a in zip(self.before, self.after)]

    def as_dict(self) -> dict:
        return {"kind": self.kind, "unit": self.unit, "before": self.before,
                "after": self.after, "delta": self.delta}


def cost_table(kind: str, m: Net, hw: tuple[int, int], *, before: Sequence[float] = (),
               after: Sequence[float] = (), batch: int = 1, repeats: int = 20) -> CostTable:
    """Per-gate costs before and after removing the gate (see the module doc)."""
    gs = groups(m)
    n = len(gs)
    if kind == "given":
        for name, table in (("method.lat_before", before), ("method.lat_after", after)):
            if len(table) != n:
                raise UserError(f"{name} must have {n} values (one per gate), got {len(table)}")
        return CostTable(kind, "ms (given)", [float(v) for v in before], [float(v) for v in after])
    if kind == "relu":
        counts = relu_counts(m, hw)
        return CostTable(kind, "thousand ReLUs per image",
                         [sum(counts[s] for s in g.sites) / 1e3 for g in gs], [0.0] * n)
    if kind == "measured":
        return _measured(m, gs, hw, batch, repeats)
    raise UserError(f"method.cost must be one of {list(COST_KINDS)}, got {kind!r}")


def _measured(m: Net, gs: list[Group], hw, batch: int, repeats: int) -> CostTable:
    """Each group's region timed with JAX on this device: BatchNorms folded and
    activations on, then activations removed and the region fused."""
    from jaxprune import linearize, merge, profile
    full = tensor_shapes(m, tuple(hw))  # includes the input's
    key = f"jax@{batch}"
    before, after = [], []
    for g in gs:
        region = region_net(m, g, full)
        size = region.spec.input_size
        dense = merge(region, input_size=size, verify=False)
        fused = merge(linearize(region, g.sites), input_size=size, cost="none", verify=False)
        before.append(profile(dense, size, latency="jax", batch=batch, repeats=repeats).latency_ms[key])
        after.append(profile(fused, size, latency="jax", batch=batch, repeats=repeats).latency_ms[key])
    device = jax.devices()[0].device_kind
    return CostTable("measured", f"ms per batch of {batch} (JAX, {device})", before, after)
