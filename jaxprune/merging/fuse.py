"""`merge(m)`: fold BatchNorms and fuse every linear run into one layer (DESIGN.md §7).

The pass, on a `Net` whose linearized sites have mask 0:

1. find every maximal run of linear operations between the remaining
   nonlinearities, as a chain of single-input single-output atoms
   (`regions.py`): conv/linear, BatchNorm (running statistics), identity
   sites, dropout, and residual sums whose branches are all in the run;
2. choose, per run, where to cut it (dynamic programming over the atoms): each
   piece becomes one layer, or an atom stays as its own layers with its
   BatchNorms folded. The cost model decides: `"macs"` (default: arithmetic,
   elementwise work included, then fewer layers), `"latency"` (each candidate
   timed with JAX on this machine) or `"none"` (as few layers as possible:
   fuse everything fusable);
3. compose each piece exactly (`affine.py`): the composed kernel, a bias or
   bias map `f(0)`, and border corrections where intermediate zero padding
   makes the border kernel differ (`models.layers.FusedConv`);
4. rebuild the graph and check it against the original on random inputs.

The result is inference-only (BatchNorms folded, dropout gone) and, when a
fused layer has border data, fixed to the input size it was merged for.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError, closest
from jaxprune.merging import COST_MODELS
from models.layers import Conv, FusedConv, Linear
from models.net import Net

from jaxprune.merging import profiling as prof
from jaxprune.merging.affine import DenseMap, NotFusable, SpatialMap, _union
from jaxprune.merging.fold import apply_numpy, compose, eval_mode
from jaxprune.merging.regions import Atom, GraphInfo

# Relative size below which a border correction is float64 rounding noise of the composition.
_KERNEL_TOL = 1e-9
# A bias map whose positions differ by less than this (relative) is one bias per channel.
_BIAS_TOL = 1e-6
# Composing a run whose border variants would need more memory than this is refused.
_COMPOSE_BYTES = 2 * 2**30
# Under "latency", candidates with more than this many times the arithmetic of the
# layers they replace are not timed: they are taken to be slower.
_LATENCY_MAC_RATIO = 2.0


@dataclasses.dataclass(frozen=True)
class Cost:
    """What one choice costs: arithmetic (MACs + elementwise), layers, measured ms."""
    macs: float = 0.0
    layers: int = 0
    ms: float = 0.0

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.macs + o.macs, self.layers + o.layers, self.ms + o.ms)


@dataclasses.dataclass(frozen=True)
class Plan:
    cost: Cost
    fused: tuple = ()   # Atom-like pieces (src, dst, nodes) that become one layer
    kept: tuple = ()    # node names kept as they are

    def __add__(self, o: "Plan") -> "Plan":
        return Plan(self.cost + o.cost, self.fused + o.fused, self.kept + o.kept)

    def rank(self, model: str) -> tuple:
        """Cost under `model`; at equal cost, fewer pieces (one fused layer over several)."""
        return (*_key(model, self.cost), len(self.fused) + len(self.kept))


def _key(model: str, c: Cost) -> tuple:
    if model == "macs":
        return (c.macs, c.layers)
    if model == "latency":
        return (c.ms, c.layers)
    return (c.layers, c.macs)


def _span(mask: np.ndarray) -> tuple[int, int]:
    idx = np.flatnonzero(mask)
    return int(idx[0]), int(idx[-1])


_NO_RNGS = nnx.Rngs(0)  # fused layers get their weights from the composition, not an init


def _given(value: np.ndarray):
    """An initializer returning the composed weights (no random init to compile and discard)."""
    return lambda key, shape, dtype=jnp.float32: jnp.asarray(np.asarray(value, dtype).reshape(shape))


@dataclasses.dataclass
class _Layout:
    """Shape of the layer a SpatialMap becomes, known from the geometry alone."""
    base: tuple          # (u0, u1, v0, v1): taps of the composed kernel that ever read input
    padding: tuple       # ((lo, hi), (lo, hi)) of the base conv
    corrections: list    # (rows, cols, [(sign, class pair)], (u0, u1, v0, v1))

    def macs(self, M: SpatialMap) -> int:
        ho, wo = M.rows.size, M.cols.size
        per_tap = (M.cin // M.groups) * M.cout
        u0, u1, v0, v1 = self.base
        total = ho * wo * (u1 - u0 + 1) * (v1 - v0 + 1) * per_tap
        for rows, cols, _, (a0, a1, b0, b1) in self.corrections:
            # output positions the correction window visits: whole rows, whole cols, corners
            n = (len(rows) * wo if cols is None else len(cols) * ho if rows is None
                 else len(rows) * len(cols))
            total += n * (a1 - a0 + 1) * (b1 - b0 + 1) * per_tap
        return total


def _layout(M: SpatialMap) -> _Layout:
    rows, cols = M.rows, M.cols
    ho, wo = rows.size, cols.size
    # Taps that never read real input (a kernel wider than a small map) are dropped.
    (u0, u1), (v0, v1) = _span(rows.relevant(range(ho))), _span(cols.relevant(range(wo)))
    pads = []
    for ax, a, b in ((rows, u0, u1), (cols, v0, v1)):
        lo = ax.offset - a
        pads.append((lo, ax.stride * (ax.size - 1) + (b - a + 1) - ax.in_size - lo))
    corrections = []

    def correction(terms, rpos, cpos):
        box = None
        for _, pair in terms:
            box = _union(box, M.deltas[pair])
        if box is None:
            return
        (a0, a1), (b0, b1) = (_span(rows.relevant(range(ho) if rpos is None else rpos)),
                              _span(cols.relevant(range(wo) if cpos is None else cpos)))
        box = (max(box[0], a0), min(box[1], a1), max(box[2], b0), min(box[3], b1))
        if box[0] <= box[1] and box[2] <= box[3]:
            corrections.append((rpos, cpos, terms, box))

    positions = lambda ax, c: tuple(i for i, x in enumerate(ax.cls) if x == c)  # noqa: E731
    rcls = {r: positions(rows, r) for r in rows.classes if r}
    ccls = {c: positions(cols, c) for c in cols.classes if c}
    # exact kernel at (r, c) = interior + row part + column part + corner part
    for r, rp in rcls.items():
        correction([(1, (r, 0)), (-1, (0, 0))], rp, None)
    for c, cp in ccls.items():
        correction([(1, (0, c)), (-1, (0, 0))], None, cp)
    for r, rp in rcls.items():
        for c, cp in ccls.items():
            correction([(1, (r, c)), (-1, (r, 0)), (-1, (0, c)), (1, (0, 0))], rp, cp)
    return _Layout((u0, u1, v0, v1), tuple(pads), corrections)


def _spatial_layer(M: SpatialMap, bias: np.ndarray | None, model_size=None) -> Conv | FusedConv:
    """The layer computing `M` plus the measured bias map `bias` (Ho, Wo, cout), exactly.
    Without kernels or bias (geometry only) it has the right shapes and zero weights."""
    rows, cols, K = M.rows, M.cols, M.kernels
    lay = _layout(M)
    u0, u1, v0, v1 = lay.base
    border = []
    scale = max(float(np.abs(K[(0, 0)]).max()), 1e-30) if K is not None else 1.0
    for rpos, cpos, terms, (a0, a1, b0, b1) in lay.corrections:
        if K is None:
            border.append((rpos, cpos, (a0 - rows.offset, b0 - cols.offset),
                           np.zeros((a1 - a0 + 1, b1 - b0 + 1, M.cin // M.groups, M.cout))))
            continue
        delta = sum(sign * K[pair][a0:a1 + 1, b0:b1 + 1] for sign, pair in terms)
        nz = np.abs(delta) > _KERNEL_TOL * scale  # below: float64 rounding of equal sums
        if not nz.any():
            continue
        (c0, c1), (d0, d1) = _span(nz.any(axis=(1, 2, 3))), _span(nz.any(axis=(0, 2, 3)))
        border.append((rpos, cpos, (a0 + c0 - rows.offset, b0 + d0 - cols.offset),
                       delta[c0:c1 + 1, d0:d1 + 1]))
    base = (K[(0, 0)] if K is not None else
            np.zeros((rows.extent, cols.extent, M.cin // M.groups, M.cout)))[u0:u1 + 1, v0:v1 + 1]
    if bias is None:
        flat, constant = np.zeros((1, M.cout)), M.pointwise
    else:
        flat = bias.reshape(-1, M.cout)
        constant = (float(np.ptp(flat, axis=0).max())
                    <= _BIAS_TOL * max(float(np.abs(flat).max()), 1e-30))
    kernel_size = base.shape[:2]
    padding = lay.padding
    if min(min(p) for p in padding) < 0:
        # a crop (the run never reads the last rows): a plain Conv gets padding 0 there
        # when that gives the same output size, else the layer keeps the crop
        clamped = tuple((lo, max(hi, 0)) for lo, hi in padding)
        fits = all((n + lo + hi - k) // s + 1 == out for n, (lo, hi), k, s, out in zip(
            (rows.in_size, cols.in_size), clamped, kernel_size, M.stride, (rows.size, cols.size)))
        padding = clamped if fits else padding
    if constant and not border and min(min(p) for p in padding) >= 0:
        layer = Conv(M.cin, M.cout, kernel_size, stride=M.stride, padding=padding,
                     groups=M.groups, bias=True, rngs=_NO_RNGS, kernel_init=_given(base))
        layer.bias.value = jnp.asarray(flat.mean(0).astype(np.float32))
        return layer
    layer = FusedConv(M.cin, M.cout, kernel_size, stride=M.stride, padding=lay.padding,
                      groups=M.groups, in_size=(rows.in_size, cols.in_size),
                      out_size=(rows.size, cols.size), bias_map=not constant,
                      border_at=[(r, c, uv) for r, c, uv, _ in border],
                      border_shapes=[d.shape[:2] for *_, d in border], model_size=model_size)
    layer.kernel.value = jnp.asarray(base.astype(np.float32))
    if constant:
        layer.bias.value = jnp.asarray(flat.mean(0).astype(np.float32))
    elif bias is not None:
        layer.bias_map.value = jnp.asarray(bias.astype(np.float32))
    for var, (*_, d) in zip(layer.border, border):
        var.value = jnp.asarray(d.astype(np.float32))
    return layer


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _too_big(M) -> NotFusable | None:
    """Why composing a run up to map `M` into one layer needs too much memory (quoting what
    it needs), or None. A dense product is formed at the end of its run only."""
    need = M.peak_bytes + (M.product_bytes if isinstance(M, DenseMap) else 0)
    if need <= _COMPOSE_BYTES:
        return None
    return NotFusable(f"composing it exactly would need {_size(need)} "
                      f"(limit {_size(_COMPOSE_BYTES)})")


def _describe(layer) -> str:
    if isinstance(layer, (Conv, FusedConv)):
        kh, kw = layer.kernel_size
        s = layer.stride[0] if layer.stride[0] == layer.stride[1] else tuple(layer.stride)
        g = f" groups {layer.groups}" if layer.groups > 1 else ""
        text = f"conv {kh}x{kw}/{s} {layer.cin}->{layer.cout}{g}"
        if isinstance(layer, FusedConv):
            extras = ["bias map"] if layer.bias_map is not None else []
            if len(layer.border):
                extras.append(f"{len(layer.border)} border corrections")
            text += f" ({', '.join(extras)})"
        return text
    if isinstance(layer, Linear):
        return f"linear {layer.din}->{layer.dout}"
    return "identity"


class _Planner:
    """Plans the cuts of every linear run. Under the "latency" cost model the layers to
    time are first collected (`requests`, while every time reads 0), then timed together
    by `jaxprune.measure` (`timed`), and the runs are planned again with the times."""

    def __init__(self, m: Net, hw: tuple[int, int], cost: str, batch: int,
                 timings: dict | None = None, cuts=frozenset()):
        self.m, self.hw, self.model, self.batch = m, hw, cost, batch
        self.g = GraphInfo(m, cuts)
        self.shapes = prof.tensor_shapes(m, hw)
        self.built: dict = {}      # (src, dst) -> layer, None (identity) or NotFusable
        self.atom_plans: dict = {}
        self.chain_spatial: dict = {}  # (src, dst) -> composed as convs (else as linears)
        self.timings: dict = timings or {}  # key -> ms per call at `batch`
        self.requests: dict = {}            # key -> (layer, input shapes) not timed yet

    # -- costs ---------------------------------------------------------------------------
    def _elementwise(self, n: str) -> int:
        return math.prod(self.shapes[n][1:])

    def _time(self, key, layer, in_shapes) -> float:
        if key in self.timings:
            return self.timings[key]
        self.requests[key] = (layer, in_shapes)
        return 0.0

    def timed(self) -> dict:
        """Every requested layer timed at `batch` in one JAX process of its own, the
        layers alternating call by call (`jaxprune.measure`, workload `jax_layers`)."""
        from jaxprune.measure import Workload, measure
        keys = list(self.requests)
        ws = [Workload(str(k), "jax", "jaxprune.measure.workloads:jax_layers",
                       {"batch": self.batch, "kind": type(layer).__name__,
                        "config": layer.config(), "input_shapes": [list(s[1:]) for s in ins]})
              for k, (layer, ins) in enumerate(self.requests.values())]
        t = measure(ws, rounds=1, warmup=2, repeats=5, separate=False)
        return {key: t[str(k)].median_ms for k, key in enumerate(keys)}

    def keep_cost(self, n: str) -> Cost:
        kind, layer = self.g.kind[n], self.m.layers[n]
        if kind == "identity":
            return Cost()
        ins = [self.shapes[i] for i in self.g.inputs[n]]
        work = layer.macs(ins, self.shapes[n])
        if kind in ("channelwise", "add"):  # a pass over the map (a conv's bias is not)
            work += self._elementwise(n) * max(len(ins) - 1, 1)
        ms = self._time(("keep", n), layer, ins) if self.model == "latency" else 0.0
        return Cost(work, 1, ms)

    # -- composition ---------------------------------------------------------------------
    def _ordered(self, nodes) -> list[str]:
        return sorted(nodes, key=self.g.pos.__getitem__)

    def start_map(self, src: str, spatial: bool, weights: bool):
        """The identity map at `src`: spatial (convs in the run) or dense (linears only)."""
        shape = self.shapes[src]
        if spatial:
            if len(shape) != 4:
                raise NotFusable(f"a conv run whose input is not an NHWC map ({shape})")
            return SpatialMap.identity(shape[1], shape[2], shape[3], weights)
        return DenseMap.identity(shape[-1], weights)

    def extend(self, M, src: str, nodes, weights: bool):
        """Map `M` (at `src`) carried through `nodes`; returns the map at the last node."""
        maps = {src: M}
        for n in self._ordered(nodes):
            maps[n] = compose(self.g.kind[n], self.m.layers[n],
                              [maps[i] for i in self.g.inputs[n]], weights)
        # a spatial map's kernels only grow: a longer run would need more still
        if isinstance(maps[n], SpatialMap) and (refusal := _too_big(maps[n])):
            raise refusal
        return maps[n]

    def spatial(self, nodes) -> bool:
        return any(self.g.kind[n] == "conv" for n in nodes)

    def build(self, src: str, dst: str, nodes):
        """The one layer computing region (src, dst) (None: an identity), or NotFusable."""
        key = (src, dst)
        if key not in self.built:
            try:
                self.built[key] = self._build(src, dst, nodes)
            except NotFusable as e:
                self.built[key] = e
        return self.built[key]

    def _build(self, src, dst, nodes):
        kinds = {self.g.kind[n] for n in nodes}
        if kinds == {"identity"}:
            return None
        spatial = self.chain_spatial.get((src, dst), self.spatial(nodes))
        M = self.extend(self.start_map(src, spatial, True), src, nodes, weights=True)
        env = {src: np.zeros(self.shapes[src][1:])}  # the bias (map): the run applied to 0
        for n in self._ordered(nodes):
            env[n] = apply_numpy(self.g.kind[n], self.m.layers[n], [env[i] for i in self.g.inputs[n]])
        bias = env[dst]
        if isinstance(M, DenseMap):
            return Linear(M.cin, M.cout, rngs=_NO_RNGS, kernel_init=_given(M.dense()),
                          bias_init=_given(bias.reshape(-1, M.cout)[0]))
        return _spatial_layer(M, bias, self.hw)

    def geometries(self, chain: list[Atom]) -> dict:
        """The fused map (no weights) of every piece (i, j) of a chain that may be fused,
        or why it cannot be; each piece extends the one before it by an atom."""
        spatial = self.spatial(set().union(*(a.nodes for a in chain)))
        out = {}
        for i in range(len(chain)):
            src = chain[i].src
            try:
                M = self.start_map(src, spatial, False)
                for j in range(i + 1, len(chain) + 1):
                    if j - 1 > i and self.g.must_materialize(chain, j - 1):
                        break
                    M = self.extend(M, chain[j - 1].src, chain[j - 1].nodes, False)
                    out[(i, j)] = _too_big(M) or M
                    self.chain_spatial[(src, chain[j - 1].dst)] = spatial
            except NotFusable as e:  # and so is every longer piece from i
                out.update({(i, j): e for j in range(i + 1, len(chain) + 1) if (i, j) not in out})
        return out

    def estimate(self, M, dst: str, nodes) -> Cost:
        """The fused layer's arithmetic from the geometry alone (no weights composed)."""
        if {self.g.kind[n] for n in nodes} == {"identity"}:
            return Cost()
        out = self._elementwise(dst)
        if isinstance(M, DenseMap):
            return Cost(out // M.cout * M.cin * M.cout, 1)
        # a bias map is a pass over the output; a per-channel bias rides along the conv
        return Cost(_layout(M).macs(M) + (out if M.bias_varies else 0), 1)

    # -- planning ------------------------------------------------------------------------
    def fuse_plan(self, src, dst, nodes, M, bound: Cost) -> Plan | NotFusable | None:
        """Fusing region (src, dst) (geometry `M`) into one layer; `bound`: its atoms kept."""
        kinds = {self.g.kind[n] for n in nodes}
        if kinds != {"identity"} and not kinds & {"conv", "linear"}:
            return None  # only BatchNorms / sums: fusing would add a weight layer
        if isinstance(M, NotFusable):
            return M
        if self.g.cuts & (set(nodes) - {dst}):
            return None  # a requested cut inside (e.g. in a residual branch): not one layer
        est = self.estimate(M, dst, nodes)
        piece = Atom(src, dst, frozenset(nodes))
        if self.model != "latency" or est.layers == 0:
            return Plan(est, (piece,))
        if est.macs > _LATENCY_MAC_RATIO * bound.macs:
            return Plan(Cost(est.macs, 1, math.inf), (piece,))  # not worth timing
        layer = (_spatial_layer(M, None) if isinstance(M, SpatialMap)
                 else Linear(M.cin, M.cout, rngs=_NO_RNGS))
        ms = self._time(("fuse", src, dst), layer, [self.shapes[src]])
        return Plan(Cost(est.macs, 1, ms), (piece,))

    def keep_plan(self, nodes) -> Plan:
        plan = Plan(Cost())
        for n in self._ordered(nodes):
            plan += Plan(self.keep_cost(n), kept=(n,))
        return plan

    def atom_plan(self, atom: Atom) -> Plan:
        """An atom not fused as a whole: its branches planned on their own, the sum kept."""
        if atom not in self.atom_plans:
            plan = None
            if len(atom.nodes) > 1 and self.g.kind[atom.dst] == "add":
                branches = self.g.branches(atom)
                if branches is not None:
                    plan = Plan(self.keep_cost(atom.dst), kept=(atom.dst,))
                    for inp, nodes in branches:
                        if nodes:
                            plan += self.region_plan(atom.src, inp, nodes)
            self.atom_plans[atom] = plan if plan is not None else self.keep_plan(atom.nodes)
        return self.atom_plans[atom]

    def region_plan(self, src, dst, nodes) -> Plan:
        chain = self.g.chain_from(src, universe=nodes, stop=dst)
        if not chain or chain[-1].dst != dst or set().union(*(a.nodes for a in chain)) != nodes:
            return self.keep_plan(nodes)
        return self.chain_plan(chain)[0]

    def chain_plan(self, chain: list[Atom]):
        """Best cut of a chain; also the cost of fusing it whole (or why it cannot be)."""
        k = len(chain)
        best: list[Plan | None] = [Plan(Cost())] + [None] * k
        whole = None
        geometry = self.geometries(chain)
        for j in range(1, k + 1):
            nodes, decomposed = set(), Plan(Cost())
            for i in range(j - 1, -1, -1):
                if i < j - 1 and self.g.must_materialize(chain, i + 1):
                    break
                nodes |= chain[i].nodes
                decomposed = self.atom_plan(chain[i]) + decomposed
                options = []
                if i == j - 1:
                    options.append(self.atom_plan(chain[i]))
                fused = self.fuse_plan(chain[i].src, chain[j - 1].dst, nodes, geometry[(i, j)],
                                       decomposed.cost)
                if i == 0 and j == k:
                    whole = fused
                if isinstance(fused, Plan):
                    options.append(fused)
                for opt in options:
                    total = best[i] + opt
                    if best[j] is None or total.rank(self.model) < best[j].rank(self.model):
                        best[j] = total
        return best[k], whole


@dataclasses.dataclass
class MergeReport:
    """What `merge` did: profiles before/after, the fused layers, the runs left alone and why."""
    input_size: tuple[int, int]
    cost_model: str
    before: prof.Profile
    after: prof.Profile
    fused: list[dict]
    skipped: list[dict]
    removed: list[str]
    max_abs_diff: float | None
    logit_scale: float | None

    def as_dict(self) -> dict:
        """The `merge` section of results.json (DESIGN.md §9) plus the details."""
        b, a = self.before, self.after
        return {"depth_before": b.depth, "depth_after": a.depth,
                "params_before": b.params, "params_after": a.params,
                "macs_before": b.macs, "macs_after": a.macs,
                "max_abs_diff": self.max_abs_diff, "logit_scale": self.logit_scale,
                "input_size": list(self.input_size), "cost_model": self.cost_model,
                "border_params_after": a.border_params,
                "fused": self.fused, "skipped": self.skipped, "removed": self.removed}

    def __str__(self) -> str:
        b, a = self.before, self.after
        lines = [f"merge at {self.input_size[0]}x{self.input_size[1]} (cost model: {self.cost_model})",
                 f"  {'':8}{'depth':>7}{'params':>14}{'MACs':>16}",
                 f"  {'before':8}{b.depth:>7}{b.params:>14,}{b.macs:>16,}",
                 f"  {'after':8}{a.depth:>7}{a.params:>14,}{a.macs:>16,}"]
        if a.border_params:
            lines.append(f"  ({a.border_params:,} of the parameters after are border data)")
        if self.max_abs_diff is not None:
            lines.append(f"  max |logits difference| {self.max_abs_diff:.2e} "
                         f"(logits up to {self.logit_scale:.2e})")
        for f in self.fused:
            lines.append(f"  fused {f['layer']}: {f['op']} <- {len(f['replaces'])} layers "
                         f"({f['replaces'][0]} .. {f['replaces'][-1]})")
        for s in self.skipped:
            lines.append(f"  kept {s['run'][0]} .. {s['run'][1]}: {s['reason']}")
        if self.removed:
            lines.append(f"  identities removed: {len(self.removed)}")
        return "\n".join(lines)


def _fmt(c: Cost, model: str) -> str:
    if model == "latency":
        return f"{c.ms:.3f} ms" if math.isfinite(c.ms) else f"{c.macs / 1e6:.2f} MMAC (not timed)"
    return f"{c.macs / 1e6:.2f} MMAC in {c.layers} layers"


def merge(m: Net, *, input_size=None, cost: str = "macs", batch: int = 1, verify: bool = True,
          return_report: bool = False, cuts=()):
    """A new, shallower model computing the same function as `m` in eval mode.

    `input_size` (H, W): the size the fused border data are made for (default:
    the model's native size). `cost`: "macs", "latency" (timed at `batch`) or
    "none" (fuse every fusable run). `verify` compares both models on random
    inputs. With `return_report=True` returns `(model, MergeReport)`.
    `cuts`: layer names whose outputs stay materialized, so no fused layer spans them
    (a plan chosen elsewhere, e.g. LayerMerge's, with `cost="none"` to fuse every piece
    between them); an unknown name raises `UserError` listing the closest.
    """
    if not isinstance(m, Net):
        raise UserError(f"merge takes a jaxprune model (models.Net), not {type(m).__name__}")
    if cost not in COST_MODELS:
        raise UserError(f"merge: unknown cost model {cost!r}; use one of {list(COST_MODELS)}")
    hw = prof.input_hw(m, input_size)
    cuts = frozenset(cuts)
    unknown = sorted(cuts - set(m.layers))
    if unknown:
        raise UserError(f"merge: cut {unknown[0]!r} is not a layer of the model; "
                        f"{closest(unknown[0], m.layers)}")
    with eval_mode(m):
        new, report = _merge(m, hw, cost, batch, verify, cuts)
    return (new, report) if return_report else new


def _merge(m: Net, hw, cost: str, batch: int, verify: bool, cuts=frozenset()):
    planner = _Planner(m, hw, cost, batch, cuts=cuts)
    g = planner.g
    plans = [(chain, *planner.chain_plan(chain)) for chain in g.chains()]
    if planner.requests:  # the latency cost model: time what was asked for, plan again
        planner = _Planner(m, hw, cost, batch, planner.timed(), cuts)
        plans = [(chain, *planner.chain_plan(chain)) for chain in g.chains()]
    fused, kept, skipped = [], set(), []
    for chain, plan, whole in plans:
        fused.extend(plan.fused)
        kept.update(plan.kept)
        nodes = set().union(*(a.nodes for a in chain))
        if (len(plan.fused) == 1 and plan.fused[0].nodes == nodes) or sum(
                g.kind[n] != "identity" for n in nodes) < 2:
            continue  # fused whole, or nothing to fuse
        run = [planner._ordered(chain[0].nodes)[0], chain[-1].dst]
        inner = [a.src for k, a in enumerate(chain) if k and g.must_materialize(chain, k)]
        asked = [n for n in planner._ordered(nodes) if n in g.cuts and n != chain[-1].dst]
        if asked:
            reason = f"cut on request (after {', '.join(asked)})"
        elif inner:
            reason = f"an intermediate result is read elsewhere (after {', '.join(inner)})"
        elif isinstance(whole, NotFusable):
            reason = f"not one layer: {whole}"
        elif isinstance(whole, Plan):
            reason = (f"fused whole it would cost {_fmt(whole.cost, cost)}, as chosen "
                      f"{_fmt(plan.cost, cost)} ({cost} cost model)")
        else:
            reason = "only normalizations and sums: fusing would add a weight layer"
        skipped.append({"run": run, "reason": reason})

    for p in fused:
        layer = planner.build(p.src, p.dst, p.nodes)
        if isinstance(layer, NotFusable):
            raise RuntimeError(f"merge: the planned fusion {p.src} -> {p.dst} failed: {layer}")
    new = _rebuild(m, planner, fused)
    report_fused, removed = [], [n for n in kept if g.kind[n] == "identity"]
    for piece in fused:
        layer = planner.built[(piece.src, piece.dst)]
        names = planner._ordered(piece.nodes)
        if layer is None:
            removed.extend(names)
        elif len(names) > 1:
            ins = lambda n: [planner.shapes[i] for i in g.inputs[n]]  # noqa: E731
            report_fused.append({
                "layer": _fused_name(planner, piece), "replaces": names, "op": _describe(layer),
                "macs_before": sum(m.layers[n].macs(ins(n), planner.shapes[n]) for n in names),
                "macs_after": layer.macs([planner.shapes[piece.src]], planner.shapes[piece.dst])})
    diff = scale = None
    if verify:
        diff, scale = _verify(m, new, hw)
    report = MergeReport(tuple(hw), cost, prof.profile(m, hw), prof.profile(new, hw),
                         report_fused, skipped, sorted(set(removed), key=g.pos.__getitem__),
                         diff, scale)
    return new, report


def _fused_name(planner: _Planner, piece) -> str:
    """The fused layer takes the name of its first weight layer (a torch module path)."""
    names = planner._ordered(piece.nodes)
    weights = [n for n in names if planner.g.kind[n] in ("conv", "linear")]
    return (weights or names)[0]


def _rebuild(m: Net, planner: _Planner, fused) -> Net:
    g = planner.g
    by_dst = {p.dst: p for p in fused}
    inside = set().union(*(p.nodes for p in fused)) if fused else set()
    alias: dict[str, str] = {}
    layers, graph = {}, []

    def res(t):
        while t in alias:
            t = alias[t]
        return t

    for n in g.order:
        if n in by_dst:
            p = by_dst[n]
            layer = planner.built[(p.src, p.dst)]
            if layer is None and n != g.output:
                alias[n] = res(p.src)
                continue
            name = _fused_name(planner, p)
            layers[name] = layer if layer is not None else nnx.clone(m.layers[n])
            graph.append((name, (res(p.src),)))
            if name != n:
                alias[n] = name
        elif n in inside:
            continue
        elif g.kind[n] == "identity" and n != g.output:
            alias[n] = res(g.inputs[n][0])
        else:
            layers[n] = nnx.clone(m.layers[n])
            graph.append((n, tuple(res(i) for i in g.inputs[n])))
    spec = dataclasses.replace(
        m.spec, input_size=tuple(planner.hw),
        options=tuple(sorted({**dict(m.spec.options), "fused": True}.items())))
    new = Net(layers, tuple(graph), spec)
    new.eval()
    return new


def _verify(m: Net, new: Net, hw) -> tuple[float, float]:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *hw, m.spec.in_channels)), jnp.float32)
    ref, out = (np.asarray(jax.jit(lambda s, x, g=g: nnx.merge(g, s)(x))(s, x))
                for g, s in (nnx.split(m), nnx.split(new)))
    return float(np.max(np.abs(ref - out))), float(np.max(np.abs(ref)))
