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
   timed with JAX on this machine, less the per-call overhead it would not pay
   inside the model) or `"none"` (as few layers as possible:
   fuse everything fusable);
3. compose each piece exactly (`affine.py`): the composed kernel and bias, and
   border terms (kernels and biases per border class, counted from each edge)
   where intermediate zero padding makes the border differ
   (`models.layers.FusedConv`);
4. rebuild the graph and check it against the original on random inputs.

The result is inference-only (BatchNorms folded, dropout gone). A fused layer's
border terms are placed relative to the edges, so it is exact at every input
size from its smallest on, and the model refuses smaller inputs; where that
smallest size is above the merge size (kernels as wide as the map), or when
asked (`fixed_size=True`), the fused layers are made for the merge size only.
"""
from __future__ import annotations

import dataclasses
import json
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
    corrections: list    # (row class, col class (None: all), [(sign, class pair)], (u0, u1, v0, v1))

    def macs(self, M: SpatialMap, hw) -> int:
        """The layer's MACs on an input of `hw`: the base conv and its border kernels."""
        (h, w), per_tap = hw, (M.cin // M.groups) * M.cout
        ho, wo = M.rows.size(h), M.cols.size(w)
        u0, u1, v0, v1 = self.base
        total = ho * wo * (u1 - u0 + 1) * (v1 - v0 + 1) * per_tap
        for r, c, _, (a0, a1, b0, b1) in self.corrections:
            # output positions the correction window visits: whole rows, whole cols, corners
            n = ((wo if c is None else M.cols.count(c, w))
                 * (ho if r is None else M.rows.count(r, h)))
            total += n * (a1 - a0 + 1) * (b1 - b0 + 1) * per_tap
        return total

    def edge_positions(self, M: SpatialMap, hw) -> int:
        """Output positions with a border class at `hw` (where an edge bias may add)."""
        (h, w), (ho, wo) = hw, (M.rows.size(hw[0]), M.cols.size(hw[1]))
        rows = sum(M.rows.count(r, h) for r in M.rows.classes if r)
        cols = sum(M.cols.count(c, w) for c in M.cols.classes if c)
        return rows * wo + cols * ho


def _layout(M: SpatialMap) -> _Layout:
    rows, cols = M.rows, M.cols
    # Taps that never read real input (a kernel wider than a small fixed map) are dropped.
    (u0, u1), (v0, v1) = _span(rows.relevant()), _span(cols.relevant())
    # the padding that gives (n + shift) // stride + 1 outputs for an input of n
    pads = tuple((ax.offset - a, ax.shift + (b - a + 1) - (ax.offset - a))
                 for ax, a, b in ((rows, u0, u1), (cols, v0, v1)))
    corrections = []

    def correction(terms, r, c):
        box = None
        for _, pair in terms:
            box = _union(box, M.deltas[pair])
        if box is None:
            return
        (a0, a1), (b0, b1) = _span(rows.relevant(r)), _span(cols.relevant(c))
        box = (max(box[0], a0), min(box[1], a1), max(box[2], b0), min(box[3], b1))
        if box[0] <= box[1] and box[2] <= box[3]:
            corrections.append((r, c, terms, box))

    rcls, ccls = [r for r in rows.classes if r], [c for c in cols.classes if c]
    # exact kernel at (r, c) = interior + row part + column part + corner part
    for r in rcls:
        correction(_parts(r, 0), r, None)
    for c in ccls:
        correction(_parts(0, c), None, c)
    for r in rcls:
        for c in ccls:
            correction(_parts(r, c), r, c)
    return _Layout((u0, u1, v0, v1), pads, corrections)


def _parts(r: int, c: int) -> list:
    """The signed class pairs whose sum is the row part (c = 0), the column part (r = 0)
    or the corner part of the kernel or bias at class pair (r, c)."""
    if c == 0:
        return [(1, (r, 0)), (-1, (0, 0))]
    if r == 0:
        return [(1, (0, c)), (-1, (0, 0))]
    return [(1, (r, c)), (-1, (r, 0)), (-1, (0, c)), (1, (0, 0))]


def _border_free(M: SpatialMap) -> bool:
    """No position of any size has a border class: the interior conv is exact everywhere."""
    return all(not any(ax.top) and not any(map(any, ax.bottom)) for ax in (M.rows, M.cols))


def _edges(ax) -> dict:
    """A `FusedConv`'s `EdgeClasses` config from a map's axis."""
    return {"top": list(ax.top), "bottom": [list(b) for b in ax.bottom], "least": ax.least(),
            "fixed": ax.fixed}


def _spatial_layer(M: SpatialMap, model_size) -> Conv | FusedConv:
    """The layer computing `M` (kernels and biases per class pair) exactly. Without
    weights (geometry only) it has the right shapes and zero weights."""
    rows, cols, K, B = M.rows, M.cols, M.kernels, M.biases
    lay = _layout(M)
    u0, u1, v0, v1 = lay.base
    border = []
    scale = max(float(np.abs(K[(0, 0)]).max()), 1e-30) if K is not None else 1.0
    for r, c, terms, (a0, a1, b0, b1) in lay.corrections:
        if K is None:
            border.append((r, c, (a0 - rows.offset, b0 - cols.offset),
                           np.zeros((a1 - a0 + 1, b1 - b0 + 1, M.cin // M.groups, M.cout))))
            continue
        delta = sum(sign * K[pair][a0:a1 + 1, b0:b1 + 1] for sign, pair in terms)
        nz = np.abs(delta) > _KERNEL_TOL * scale  # below: float64 rounding of equal sums
        if not nz.any():
            continue
        (c0, c1), (d0, d1) = _span(nz.any(axis=(1, 2, 3))), _span(nz.any(axis=(0, 2, 3)))
        border.append((r, c, (a0 + c0 - rows.offset, b0 + d0 - cols.offset),
                       delta[c0:c1 + 1, d0:d1 + 1]))
    edge_bias = []
    if B is not None:
        bias_scale = max(float(np.abs(np.stack(list(B.values()))).max()), 1e-30)
        for r in rows.classes:
            for c in cols.classes:
                if (r, c) == (0, 0):
                    continue
                delta = sum(sign * B[pair] for sign, pair in _parts(r, c))
                if np.abs(delta).max() > _BIAS_TOL * bias_scale:
                    edge_bias.append((r or None, c or None, delta))
    base = (K[(0, 0)] if K is not None else
            np.zeros((rows.extent, cols.extent, M.cin // M.groups, M.cout)))[u0:u1 + 1, v0:v1 + 1]
    bias = B[(0, 0)] if B is not None else np.zeros(M.cout)
    kernel_size = base.shape[:2]
    if not border and not edge_bias and rows.fixed is None:  # exact at every size as it is
        layer = Conv(M.cin, M.cout, kernel_size, stride=M.stride, padding=lay.padding,
                     groups=M.groups, bias=True, rngs=_NO_RNGS, kernel_init=_given(base))
        layer.bias.value = jnp.asarray(bias.astype(np.float32))
        return layer
    layer = FusedConv(M.cin, M.cout, kernel_size, stride=M.stride, padding=lay.padding,
                      groups=M.groups, rows=_edges(rows), cols=_edges(cols),
                      border_at=[(r, c, uv) for r, c, uv, _ in border],
                      border_shapes=[d.shape[:2] for *_, d in border],
                      bias_at=[(r, c) for r, c, _ in edge_bias], model_size=model_size)
    layer.kernel.value = jnp.asarray(base.astype(np.float32))
    layer.bias.value = jnp.asarray(bias.astype(np.float32))
    if edge_bias:
        layer.edge_bias.value = jnp.asarray(np.stack([d for *_, d in edge_bias]).astype(np.float32))
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
            n_bias = len(layer.geometry.bias_terms)
            text += f" ({len(layer.border)} border kernels, {n_bias} edge biases)"
        return text
    if isinstance(layer, Linear):
        return f"linear {layer.din}->{layer.dout}"
    return "identity"


class _Planner:
    """Plans the cuts of every linear run. Under the "latency" cost model the layers to
    time are first collected (`requests`, while every time reads 0), then timed together
    by `jaxprune.measure` (`timed`), and the runs are planned again with the times."""

    def __init__(self, m: Net, hw: tuple[int, int], cost: str, batch: int, fixed_size: bool,
                 timings: dict | None = None, cuts=frozenset()):
        self.m, self.hw, self.model, self.batch = m, hw, cost, batch
        self.fixed_size = fixed_size
        self.g = GraphInfo(m, cuts)
        self.shapes = prof.tensor_shapes(m, hw)
        self.built: dict = {}      # (src, dst) -> layer, None (identity) or NotFusable
        self.atom_plans: dict = {}
        self.chain_spatial: dict = {}  # (src, dst) -> composed as convs (else as linears)
        # (src, dst) -> ("any" or "fixed", its size-agnostic geometry or why it has none):
        # the form of the layer a piece becomes on its own
        self.forms: dict = {}
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
        layers alternating call by call (`jaxprune.measure`, workload `jax_layers`), each
        less JAX's per-call overhead (`measure.in_model_ms`), which a run of layers fused
        into one would otherwise be credited with once per layer it replaces.
        Layers alike (kind, config, input shapes) are timed once and get the same time,
        so equal choices are decided alike (and each compiles once). In a multi-process
        run process 0 times them and every process gets its times
        (`distributed.broadcast_json`), so all of them fuse the same model."""
        from jaxprune import distributed
        from jaxprune.measure import Workload, call_overhead, in_model_ms, measure
        args = {key: {"batch": self.batch, "kind": type(layer).__name__, "config": layer.config(),
                      "input_shapes": [list(s[1:]) for s in ins]}
                for key, (layer, ins) in self.requests.items()}
        alike = {json.dumps(a, sort_keys=True): a for a in args.values()}
        ms = None
        if distributed.is_main():
            overhead = call_overhead("jax")
            ws = [Workload(str(k), "jax", "jaxprune.measure.workloads:jax_layers", a)
                  for k, a in enumerate(alike.values())]
            t = measure([overhead, *ws], rounds=1, warmup=2, repeats=5, separate=False)
            ms = [in_model_ms(t[str(k)].median_ms, t[overhead.name].median_ms)
                  for k in range(len(alike))]
        ms = dict(zip(alike, distributed.broadcast_json(ms)))
        return {key: ms[json.dumps(a, sort_keys=True)] for key, a in args.items()}

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

    def start_map(self, src: str, spatial: bool, weights: bool, fixed: bool = False):
        """The identity map at `src`: spatial (convs in the run; `fixed`: for the merge
        size only, else for every size) or dense (linears only)."""
        shape = self.shapes[src]
        if spatial:
            if len(shape) != 4:
                raise NotFusable(f"a conv run whose input is not an NHWC map ({shape})")
            return SpatialMap.identity(shape[1], shape[2], shape[3], weights, fixed)
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

    def build(self, src: str, dst: str, nodes, fixed: bool):
        """The one layer computing region (src, dst) (None: an identity), or NotFusable;
        `fixed`: made for the merge size only."""
        key = (src, dst)
        if key not in self.built:
            try:
                self.built[key] = self._build(src, dst, nodes, fixed)
            except NotFusable as e:
                self.built[key] = e
        return self.built[key]

    def _build(self, src, dst, nodes, fixed: bool):
        kinds = {self.g.kind[n] for n in nodes}
        if kinds == {"identity"}:
            return None
        spatial = self.chain_spatial.get((src, dst), self.spatial(nodes))
        M = self.extend(self.start_map(src, spatial, True, fixed), src, nodes, weights=True)
        if isinstance(M, SpatialMap):
            return _spatial_layer(M, self.hw)
        env = {src: np.zeros(self.shapes[src][1:])}  # the bias: the run applied to 0
        for n in self._ordered(nodes):
            env[n] = apply_numpy(self.g.kind[n], self.m.layers[n], [env[i] for i in self.g.inputs[n]])
        return Linear(M.cin, M.cout, rngs=_NO_RNGS, kernel_init=_given(M.dense()),
                      bias_init=_given(env[dst].reshape(-1, M.cout)[0]))

    def fits(self, M: SpatialMap, src: str) -> bool:
        """Whether a size-agnostic map holds at the merge size (its smallest input is no
        larger than the piece's input there)."""
        h, w = self.shapes[src][1:3]
        return M.rows.least() <= h and M.cols.least() <= w

    def fixed_form(self, src: str, dst: str) -> bool:
        """Whether the planned layer of piece (src, dst) is made for the merge size only."""
        return self.forms.get((src, dst), ("any",))[0] == "fixed"

    def geometries(self, chain: list[Atom]) -> dict:
        """The fused map (no weights) of every piece (i, j) of a chain that may be fused,
        or why it cannot be; each piece extends the one before it by an atom. A spatial
        piece is size-agnostic where that holds at the merge size and fixed to it is not
        asked for (a run without border terms always is), else fixed to the merge size,
        and so is every longer piece from the same start."""
        spatial = self.spatial(set().union(*(a.nodes for a in chain)))
        out = {}
        for i in range(len(chain)):
            src = chain[i].src
            agnostic, fixed = self.start_map(src, spatial, False), None
            try:
                for j in range(i + 1, len(chain) + 1):
                    if j - 1 > i and self.g.must_materialize(chain, j - 1):
                        break
                    atom = chain[j - 1]
                    self.chain_spatial[(src, atom.dst)] = spatial
                    if fixed is None:
                        try:
                            agnostic = self.extend(agnostic, atom.src, atom.nodes, False)
                        except NotFusable as e:  # its kernels' memory: the fixed form may fit
                            agnostic = e
                        if isinstance(agnostic, DenseMap) or isinstance(agnostic, SpatialMap) and (
                                _border_free(agnostic)
                                or not self.fixed_size and self.fits(agnostic, src)):
                            self.forms[(src, atom.dst)] = ("any", agnostic)
                            out[(i, j)] = _too_big(agnostic) or agnostic
                            continue
                        fixed = self.extend(self.start_map(src, spatial, False, True), src,
                                            set().union(*(a.nodes for a in chain[i:j])), False)
                    else:
                        fixed = self.extend(fixed, atom.src, atom.nodes, False)
                    self.forms[(src, atom.dst)] = ("fixed", agnostic)
                    out[(i, j)] = fixed
            except NotFusable as e:  # and so is every longer piece from i
                out.update({(i, j): e for j in range(i + 1, len(chain) + 1) if (i, j) not in out})
        return out

    def estimate(self, M, src: str, dst: str, nodes) -> Cost:
        """The fused layer's arithmetic from the geometry alone (no weights composed)."""
        if {self.g.kind[n] for n in nodes} == {"identity"}:
            return Cost()
        if isinstance(M, DenseMap):
            return Cost(self._elementwise(dst) // M.cout * M.cin * M.cout, 1)
        # edge biases are additions on the border positions; the interior bias rides
        # along the conv
        lay, hw = _layout(M), self.shapes[src][1:3]
        return Cost(lay.macs(M, hw) + (lay.edge_positions(M, hw) * M.cout if M.biased else 0), 1)

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
        est = self.estimate(M, src, dst, nodes)
        piece = Atom(src, dst, frozenset(nodes))
        if self.model != "latency" or est.layers == 0:
            return Plan(est, (piece,))
        if est.macs > _LATENCY_MAC_RATIO * bound.macs:
            return Plan(Cost(est.macs, 1, math.inf), (piece,))  # not worth timing
        layer = (_spatial_layer(M, self.hw) if isinstance(M, SpatialMap)
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
    """What `merge` did: profiles before/after, the fused layers, the runs left alone and why,
    and the input sizes the fused model runs at (`input_sizes`: kind "any", "min" (every
    size from `size` on) or "fixed" (`size` only, `why`))."""
    input_size: tuple[int, int]
    cost_model: str
    before: prof.Profile
    after: prof.Profile
    fused: list[dict]
    skipped: list[dict]
    removed: list[str]
    max_abs_diff: float | None
    logit_scale: float | None
    input_sizes: dict = dataclasses.field(default_factory=lambda: {"kind": "any"})

    def as_dict(self) -> dict:
        """The `merge` section of results.json (DESIGN.md §9) plus the details."""
        b, a = self.before, self.after
        return {"depth_before": b.depth, "depth_after": a.depth,
                "params_before": b.params, "params_after": a.params,
                "macs_before": b.macs, "macs_after": a.macs,
                "max_abs_diff": self.max_abs_diff, "logit_scale": self.logit_scale,
                "input_size": list(self.input_size), "cost_model": self.cost_model,
                "input_sizes": self.input_sizes,
                "border_params_after": a.border_params, "border_macs_after": a.border_macs,
                "fused": self.fused, "skipped": self.skipped, "removed": self.removed}

    def __str__(self) -> str:
        b, a = self.before, self.after
        h, w = self.input_size
        lines = [f"merge at {h}x{w} (cost model: {self.cost_model})",
                 f"  {'':8}{'depth':>7}{'params':>14}{'MACs':>16}",
                 f"  {'before':8}{b.depth:>7}{b.params:>14,}{b.macs:>16,}",
                 f"  {'after':8}{a.depth:>7}{a.params:>14,}{a.macs:>16,}",
                 f"  runs at {sizes_text(self.input_sizes)}"]
        if a.border_params:
            lines.append(f"  border terms: {a.border_params:,} of the parameters after, "
                         f"{a.border_macs:,} of the MACs at {h}x{w}")
        if self.max_abs_diff is not None:
            lines.append(f"  max |logits difference| {self.max_abs_diff:.2e} "
                         f"(logits up to {self.logit_scale:.2e})")
        for f in self.fused:
            lines.append(f"  fused {f['layer']}: {f['op']}, {f['sizes']} <- {len(f['replaces'])} "
                         f"layers ({f['replaces'][0]} .. {f['replaces'][-1]})")
        for s in self.skipped:
            lines.append(f"  kept {s['run'][0]} .. {s['run'][1]}: {s['reason']}")
        if self.removed:
            lines.append(f"  identities removed: {len(self.removed)}")
        return "\n".join(lines)


def sizes_text(sizes: dict) -> str:
    """`MergeReport.input_sizes` in words."""
    if sizes["kind"] == "min":
        return (f"every input size from {sizes['size'][0]}x{sizes['size'][1]} on (border "
                f"terms placed relative to the edges)")
    if sizes["kind"] == "fixed":
        return f"{sizes['size'][0]}x{sizes['size'][1]} inputs only: {sizes['why']}"
    return "every input size (no fused layer has border terms)"


def _fmt(c: Cost, model: str, batch: int) -> str:
    if model == "latency":
        return (f"{c.ms:.3f} ms per batch of {batch}" if math.isfinite(c.ms) else
                f"{c.macs / 1e6:.2f} MMAC (over {_LATENCY_MAC_RATIO:g}x the arithmetic of its "
                f"layers: not timed)")
    return f"{c.macs / 1e6:.2f} MMAC in {c.layers} layers"


def merge(m: Net, *, input_size=None, cost: str = "macs", batch: int = 1, verify: bool = True,
          fixed_size: bool = False, return_report: bool = False, cuts=()):
    """A new, shallower model computing the same function as `m` in eval mode.

    `input_size` (H, W): the size the merge plans, counts MACs and verifies at
    (default: the model's native size). Every fused layer is exact at every input
    size from its smallest on (its border terms are placed relative to the edges);
    the fused model refuses smaller inputs, naming the smallest it takes. Where a
    fused layer's smallest input is larger than `input_size` gives it (a kernel as
    wide as the map), or with `fixed_size=True` (fewer border parameters: one input
    size's), the fused layers are made for `input_size` only and refuse other sizes.
    `cost`: "macs", "latency" (timed at `batch`, each layer less JAX's per-call
    overhead) or "none" (fuse every fusable run).
    `verify` compares both models on random inputs at `input_size`. With
    `return_report=True` returns `(model, MergeReport)`.
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
        new, report = _merge(m, hw, cost, batch, verify, bool(fixed_size), cuts)
    return (new, report) if return_report else new


def fold_only_cuts(m: Net) -> tuple[str, ...]:
    """The `cuts` under which `merge(m, cost="none", cuts=...)` fuses no two weight layers:
    the output of every layer stays materialized but that of a conv or linear read only by
    per-channel affine layers (its BatchNorms, folded into it). What is left is `m`'s
    unfused self: BatchNorms folded, identity sites removed, every weight layer its own."""
    readers: dict[str, list[str]] = {n: [] for n in m.layers}
    for n, inputs in m.graph:
        for i in inputs:
            readers.get(i, []).append(n)
    folds = {n for n in m.layers if m.layers[n].linear_kind() in ("conv", "linear")
             and readers[n] and all(m.layers[r].linear_kind() == "channelwise"
                                    for r in readers[n])}
    return tuple(n for n in m.layers if n not in folds)


def _merge(m: Net, hw, cost: str, batch: int, verify: bool, fixed_size: bool,
           cuts=frozenset()):
    planner = _Planner(m, hw, cost, batch, fixed_size, cuts=cuts)
    g = planner.g
    plans = [(chain, *planner.chain_plan(chain)) for chain in g.chains()]
    if planner.requests:  # the latency cost model: time what was asked for, plan again
        planner = _Planner(m, hw, cost, batch, fixed_size, planner.timed(), cuts)
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
            reason = (f"fused whole it would cost {_fmt(whole.cost, cost, batch)}, as chosen "
                      f"{_fmt(plan.cost, cost, batch)} ({cost} cost model)")
        else:
            reason = "only normalizations and sums: fusing would add a weight layer"
        skipped.append({"run": run, "reason": reason})
        if cost == "latency" and isinstance(whole, Plan) and not asked and not inner:
            # the measured decision, as numbers: the run fused whole (None: not timed, more
            # than _LATENCY_MAC_RATIO times its arithmetic) against the cut chosen
            skipped[-1]["ms"] = {"fused": whole.cost.ms if math.isfinite(whole.cost.ms) else None,
                                 "chosen": plan.cost.ms}

    # One fused layer made for the merge size only makes the model so: then every fused
    # layer is (fewer border parameters), but for those without border terms.
    forced = [p for p in fused if planner.fixed_form(p.src, p.dst)]
    for p in fused:
        form, agnostic = planner.forms.get((p.src, p.dst), ("any", None))
        fixed = bool(forced) and not (form == "any" and (isinstance(agnostic, DenseMap)
                                                         or _border_free(agnostic)))
        layer = planner.build(p.src, p.dst, p.nodes, fixed)
        if isinstance(layer, NotFusable):
            raise RuntimeError(f"merge: the planned fusion {p.src} -> {p.dst} failed: {layer}")
    new = _rebuild(m, planner, fused)
    fused_convs = [(p, planner.built[(p.src, p.dst)]) for p in fused
                   if isinstance(planner.built[(p.src, p.dst)], FusedConv)]
    if forced:
        model_size = tuple(hw)
    else:
        model_size = _smallest_input(m, hw, [(p.src, layer.least()) for p, layer in fused_convs])
    for _, layer in fused_convs:
        layer.model_size = model_size
    rule = new.input_sizes()
    sizes = {"kind": "any"} if rule is None else {"kind": rule[0], "size": list(rule[1])}
    if rule is not None and rule[0] == "fixed":
        sizes["why"] = _why_fixed(planner, forced, fixed_size)

    report_fused, removed = [], [n for n in kept if g.kind[n] == "identity"]
    for piece in fused:
        layer = planner.built[(piece.src, piece.dst)]
        names = planner._ordered(piece.nodes)
        if layer is None:
            removed.extend(names)
        elif len(names) > 1:
            ins = lambda n: [planner.shapes[i] for i in g.inputs[n]]  # noqa: E731
            border = isinstance(layer, FusedConv)
            report_fused.append({
                "layer": _fused_name(planner, piece), "replaces": names, "op": _describe(layer),
                "sizes": ((f"fixed to {model_size[0]}x{model_size[1]}" if layer.fixed else
                           f"any size from {model_size[0]}x{model_size[1]}") if border
                          else "any size"),
                "macs_before": sum(m.layers[n].macs(ins(n), planner.shapes[n]) for n in names),
                "macs_after": layer.macs([planner.shapes[piece.src]], planner.shapes[piece.dst]),
                "border_params": layer.border_params() if border else 0,
                "border_macs": (layer.border_macs(*planner.shapes[piece.src][1:3]) if border
                                else 0)})
    diff = scale = None
    if verify:
        diff, scale = _verify(m, new, hw)
    report = MergeReport(tuple(hw), cost, prof.profile(m, hw), prof.profile(new, hw),
                         report_fused, skipped, sorted(set(removed), key=g.pos.__getitem__),
                         diff, scale, sizes)
    return new, report


def _why_fixed(planner: _Planner, forced, fixed_size: bool) -> str:
    """Why the fused layers are made for the merge size only."""
    if fixed_size:
        return "merged with fixed_size=True"
    p = forced[0]
    agnostic = planner.forms[(p.src, p.dst)][1]
    h, w = planner.shapes[p.src][1:3]
    if isinstance(agnostic, NotFusable):
        return f"{_fused_name(planner, p)} has no size-agnostic form ({agnostic})"
    return (f"{_fused_name(planner, p)} is exact at every size only from inputs of "
            f"{agnostic.rows.least()}x{agnostic.cols.least()} on, and gets {h}x{w} here "
            f"(merge at a larger input_size for a model that runs at every size)")


def _smallest_input(m: Net, hw, needs) -> tuple[int, int]:
    """The smallest model input (H, W) at which every fused layer gets at least its
    smallest input, `needs` = [(the tensor it reads, its smallest (h, w))], and the
    original runs: every map of it keeps a row and a column (VGG's five poolings need 32
    pixels; below, the original's output is not a number, and neither is the fused one's)."""
    if not needs:
        return tuple(hw)
    return prof.smallest_input(m, hw, lambda shapes, axis: all(
        shapes[src][axis + 1] >= least[axis] for src, least in needs) and all(
        s[axis + 1] >= 1 for s in shapes.values() if len(s) == 4))


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


def without_border_terms(m: Net) -> Net:
    """A copy of fused model `m` whose fused layers are their base conv and interior bias
    alone: inexact at the borders, for measuring what the border terms cost (the
    difference of the two models' latencies)."""
    layers = {}
    for name, layer in m.named_layers():
        if isinstance(layer, FusedConv):
            conv = Conv(layer.cin, layer.cout, layer.kernel_size, stride=layer.stride,
                        padding=layer.padding, groups=layer.groups, bias=True, rngs=_NO_RNGS,
                        kernel_init=_given(np.asarray(layer.kernel.value)))
            conv.bias.value = layer.bias.value
            layers[name] = conv
        else:
            layers[name] = nnx.clone(layer)
    new = Net(layers, m.graph, m.spec)
    new.eval()
    return new


def _verify(m: Net, new: Net, hw) -> tuple[float, float]:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *hw, m.spec.in_channels)), jnp.float32)
    ref, out = (np.asarray(jax.jit(lambda s, x, g=g: nnx.merge(g, s)(x))(s, x))
                for g, s in (nnx.split(m), nnx.split(new)))
    return float(np.max(np.abs(ref - out))), float(np.max(np.abs(ref)))
