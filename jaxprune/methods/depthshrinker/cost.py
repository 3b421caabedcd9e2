"""DepthShrinker's cost tables: what removing each gate saves, `Δ = before - after`.

`given` (the seed's LAT_BEFORE / LAT_AFTER, ms on a V100, or the config's
lists), `measured` (this device: each group's layers timed unfused with their
activations, then with them removed and fused, through `jaxprune.merge` and
`jaxprune.profile`) or `relu` (private inference, where every ReLU is an
expensive protocol step: the thousands of ReLUs per image the gate removes).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from jaxprune.activation_sites import site_sizes
from jaxprune.errors import UserError
from jaxprune.merging.profiling import tensor_shapes
from jaxprune.methods.depthshrinker import COST_KINDS
from jaxprune.methods.depthshrinker.groups import Group, groups, region_net
from models.net import Net


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
                raise UserError(f"{name} must have {n} values (one per gate of "
                                f"{m.spec.arch}), got {len(table)}; or set method.cost to "
                                f"measured or relu")
        return CostTable(kind, "ms (given)", [float(v) for v in before], [float(v) for v in after])
    if kind == "relu":
        counts = site_sizes(m, hw)
        return CostTable(kind, "thousand ReLUs per image",
                         [sum(counts[s] for s in g.sites) / 1e3 for g in gs], [0.0] * n)
    if kind == "measured":
        return _measured(m, gs, hw, batch, repeats)
    raise UserError(f"method.cost must be one of {list(COST_KINDS)}, got {kind!r}")


def _measured(m: Net, gs: list[Group], hw, batch: int, repeats: int) -> CostTable:
    """Each group's region timed with JAX on this device (`jaxprune.measure`: one process,
    the regions alternating call by call): BatchNorms folded and activations on, then
    activations removed and the region fused."""
    from converters.torch_arch import arch_dict
    from jaxprune import linearize, merge
    from jaxprune.measure import Workload, measure
    full = tensor_shapes(m, tuple(hw))  # includes the input's
    ws = []
    for g in gs:
        region = region_net(m, g, full)
        size = region.spec.input_size
        for kind, net in (("before", merge(region, input_size=size, verify=False)),
                          ("after", merge(linearize(region, g.sites), input_size=size,
                                          cost="none", verify=False))):
            ws.append(Workload(f"{g.index} {kind}", "jax", "jaxprune.measure.workloads:jax_model",
                               {"batch": batch, "input_size": list(size), "arch": arch_dict(net)}))
    t = measure(ws, rounds=1, warmup=2, repeats=repeats, separate=False)
    before = [t[f"{g.index} before"].median_ms for g in gs]
    after = [t[f"{g.index} after"].median_ms for g in gs]
    device = t[f"{gs[0].index} before"].device
    return CostTable("measured", f"ms per batch of {batch} (JAX, {device}, jaxprune.measure)",
                     before, after)
