"""The ECDC search space of a jaxprune model, and what a plan does to the model.

Positions (Kim et al., ICML 2023; the rules of the reference code, as in both ECDC and
LayerMerge): one per main-path convolution of the searched blocks, position k = the output
of conv k (after its BatchNorm, its residual add when it ends a block, and its activation
when it has one); position 0 = the input of the first searched conv (the stem's output).
The stem, the shortcut convs and everything after the last block (MobileNetV2's 1x1 head
conv, pooling, classifier) are never searched.

A segment (i, j) merges convs i+1..j into one layer. It is allowed when it

* crosses no *break*: a strided conv ends its segment, and so do the 1x1 convs that follow
  it in its block (the reference composes kernels ignoring the first conv's stride, so only
  1x1 convs may follow a strided one: ResNet breaks at its strided conv1, MobileNetV2 at
  the projection after a strided depthwise conv; the project's merge composes strides
  exactly, but the space is the papers');
* lies inside one residual block, or spans whole blocks (the identity folds into the
  centre tap); never half of one.

Activations: a position whose conv is followed by an activation site keeps it when it is
a boundary (a = 1) and loses it (linearized) when it lies strictly inside a segment.
MobileNetV2's block ends have no activation: they are the *free* positions (ECDC's
a in {0, 1}), where a plan may insert a ReLU6 after the block's output, as DepthShrinker
does after a removed block (`Net.insert_after`).

`build_space(m)` gives a `ModelSpace`: the pure `dp.Space` for the search, the positions
with their layers, and `edits(plan)`, what a `dp.Plan` changes: the sites to linearize,
the activations to insert and the tensors to keep (`merge(..., cuts=...)`), so that the
merged model runs exactly the plan's pieces. Supported: `resnet18_cifar`, `resnet18`, `resnet34`,
`mobilenet_v2` (either layout, any width), `mobilenet_v2_cifar`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping

from jaxprune.errors import UserError
from jaxprune.methods.layermerge.dp import Plan, SearchError, Space
from jaxprune.merging.regions import GraphInfo
from models.layers import Act, Conv
from models.net import Net

RESNETS = ("resnet18_cifar", "resnet18", "resnet34")
MOBILENETS = ("mobilenet_v2", "mobilenet_v2_cifar")
SUPPORTED = RESNETS + MOBILENETS
INSERTED_ACT = "relu6"  # MobileNetV2's activation, inserted at a free block end


@dataclasses.dataclass(frozen=True)
class Position:
    """Position `index`: the output of `conv` (None at 0, the first conv's input), read
    from layer `tensor`; `site` is its activation site (None: it has none)."""
    index: int
    conv: str | None
    site: str | None
    tensor: str
    stride: int = 1


@dataclasses.dataclass(frozen=True)
class Edits:
    """What a plan changes in the model: `linearize` (site names), `insert_act`
    ({new activation name: the layer it follows}) and `cuts` (layer names whose outputs
    stay materialized when merging: the plan's pieces)."""
    linearize: tuple[str, ...]
    insert_act: Mapping[str, str]
    cuts: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"linearize": list(self.linearize), "insert_act": dict(self.insert_act),
                "cuts": list(self.cuts)}


@dataclasses.dataclass(frozen=True)
class ModelSpace:
    """The search space of one model: `space` (for `dp.solve`), `positions` (0..L),
    `breaks`, `residual` ((src, tgt) per residual block), `free_after` ({free position:
    (the layer an inserted activation follows, the inserted activation's name)})."""
    arch: str
    options: Mapping
    space: Space
    positions: tuple[Position, ...]
    breaks: tuple[int, ...]
    residual: tuple[tuple[int, int], ...]
    free_after: Mapping[int, tuple[str, str]]

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        return self.space.segments

    @property
    def hash(self) -> str:
        """sha256 of the architecture and the space (positions, segments, free positions):
        what latency tables and plans are checked against."""
        data = {"arch": self.arch, "options": dict(self.options),
                "positions": [dataclasses.asdict(p) for p in self.positions],
                "segments": [list(s) for s in self.segments],
                "free": sorted(self.free_after)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def convs(self, i: int, j: int) -> tuple[str, ...]:
        """The convs segment (i, j) merges."""
        return tuple(p.conv for p in self.positions[i + 1:j + 1])

    def edits(self, plan: Plan, pieces: Mapping[tuple[int, int], tuple[int, ...]] | None = None
              ) -> Edits:
        """What `plan` changes (see `Edits`). `pieces`: {(i, j): (i, b1, ..., j)}, how a
        chosen segment runs (ECDC's T_opt breaks, `dp.t_opt`); default: merged whole.
        Raises `SearchError` for a plan of another length or with a segment the space
        does not allow."""
        L = self.space.positions
        if plan.positions != L:
            raise SearchError(f"the plan has {plan.positions} positions, this model's space "
                              f"{L}: give a plan made for this model")
        pieces = pieces or {}
        linear, insert, cut = [], {}, {0}
        for s in plan.segments:
            seg = (s.start, s.end)
            if seg not in self.space.options:
                raise SearchError(f"the plan's segment {seg} is not in this model's space "
                                  "(it crosses a break or half a residual block): give a "
                                  "plan made for this model")
            inner = tuple(pieces.get(seg, seg))
            if inner[0] != s.start or inner[-1] != s.end or list(inner) != sorted(set(inner)):
                raise SearchError(f"pieces {inner} of segment {seg} do not run from "
                                  f"{s.start} to {s.end}")
            cut.update(inner)
            linear += [p.site for p in self.positions[s.start + 1:s.end] if p.site]
            if s.end in self.free_after:
                if s.act_end:
                    after, name = self.free_after[s.end]
                    insert[name] = after
            elif not s.act_end:
                raise SearchError(f"the plan drops the activation at position {s.end}, "
                                  "which is not a free position: give a plan made for "
                                  "this model's space")
        # a kept activation cuts by itself; the linear positions among the cuts are named
        kept = {p for p in cut if (self.positions[p].site and self.positions[p].site not in
                                   linear) or (p in self.free_after and self.free_after[p][1]
                                               in insert)}
        cuts = tuple(self.positions[p].tensor for p in sorted(cut - kept))
        return Edits(tuple(linear), insert, cuts)


def apply_edits(m: Net, edits: Edits) -> Net:
    """`m` with `edits` applied, in place: the activations inserted (nonlinear) and the
    sites linearized. Raises `UserError` for a site or layer `m` lacks (with the closest)."""
    from jaxprune.activation_sites import linearize
    for name, after in edits.insert_act.items():
        if name not in m.layers:
            if after not in m.layers:
                raise UserError(f"cannot insert {name!r}: the model has no layer {after!r}")
            m.insert_after(after, name, Act(INSERTED_ACT))
    return linearize(m, edits.linearize)


# -- building the space from the model ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Block:
    prefix: str         # its torch module path
    input: str          # the tensor the block reads
    output: str         # its last layer (add, its activation, or the projection's BN)
    residual: bool


def _blocks(m: Net) -> list[_Block]:
    arch = m.spec.arch
    if arch in MOBILENETS:
        import models
        return [_Block(b.prefix, b.input, b.output, b.add is not None) for b in models.blocks(m)]
    inputs = dict(m.graph)
    # torchvision's ResNet names: layerS.K.{conv1, ..., add, relu2}
    prefixes = [n[:-len(".add")] for n, _ in m.graph if n.startswith("layer") and n.endswith(".add")]
    return [_Block(p, inputs[f"{p}.conv1"][0], f"{p}.relu2", True) for p in prefixes]


def _main_convs(g: GraphInfo, m: Net, b: _Block) -> list[str]:
    """The block's convs on its main path: a chain from the first conv reading the block's
    input, each reading the one before (through BatchNorm and activations); a shortcut
    conv reads the input directly and is left out."""
    lo, hi = g.pos[b.input], g.pos[b.output]
    convs = [n for n in g.order[lo + 1:hi + 1] if isinstance(m.layers[n], Conv)]
    chain = [convs[0]]
    for c in convs[1:]:
        if chain[-1] in g.anc[c]:
            chain.append(c)
    return chain


def _site_after(g: GraphInfo, m: Net, conv: str, until: str) -> str | None:
    """The activation site that `conv`'s output reaches first, up to layer `until`."""
    for n in g.order[g.pos[conv] + 1:g.pos[until] + 1]:
        if isinstance(m.layers[n], Act) and conv in g.anc[n]:
            return n
    return None


def _positions(m: Net, blocks: list[_Block]) -> tuple[list[Position], list, list[int], dict]:
    g = GraphInfo(m)
    first_input = blocks[0].input
    stem_site = next((n for n in reversed(g.order[:g.pos[first_input] + 1])
                      if isinstance(m.layers[n], Act)), None)
    positions = [Position(0, None, stem_site, first_input)]
    residual, block_convs, free = [], [], {}
    for b in blocks:
        convs = _main_convs(g, m, b)
        start = len(positions) - 1
        for k, c in enumerate(convs):
            last = k == len(convs) - 1
            until = b.output if last else convs[k + 1]
            site = _site_after(g, m, c, until)
            if last and site is not None and site != b.output:
                raise UserError(f"{m.spec.arch}: block ending at {b.output} has its "
                                f"activation {site!r} before its output")
            if not last and site is None:
                raise UserError(f"{m.spec.arch}: conv {c!r} has no activation before the "
                                f"next conv {convs[k + 1]!r}; the space needs one")
            tensor = b.output if last else site
            positions.append(Position(len(positions), c, site, tensor,
                                      int(max(m.layers[c].stride))))
        end = len(positions) - 1
        block_convs.append((start, end))
        if b.residual:
            residual.append((start, end))
        if positions[end].site is None:
            # named as DepthShrinker names the ReLU6 it adds after a removed block
            free[end] = (b.output, f"{b.prefix}.final_act")
    breaks = []
    for start, end in block_convs:
        for p in range(start + 1, end + 1):
            if positions[p].stride > 1:
                q = p
                while q < end and m.layers[positions[q + 1].conv].kernel_size == (1, 1):
                    q += 1
                breaks.append(q)
    return positions, residual, sorted(set(breaks)), free


def _allowed(i: int, j: int, breaks, residual) -> bool:
    if any(i < b < j for b in breaks):
        return False
    return not any(i < s < j < t or s < i < t < j for s, t in residual)


def build_space(m: Net) -> ModelSpace:
    """The ECDC search space of `m` (see the module doc), built from its graph.
    Raises `UserError` for a model outside `SUPPORTED`."""
    arch = m.spec.arch
    if arch not in SUPPORTED:
        raise UserError(f"layermerge has search-space rules for {list(SUPPORTED)}, not "
                        f"{arch!r}: pick one of them for model.name")
    if dict(m.spec.options).get("fused"):
        raise UserError("layermerge searches an unfused model; this one was merged already")
    positions, residual, breaks, free = _positions(m, _blocks(m))
    L = len(positions) - 1
    segments = [(i, j) for i in range(L) for j in range(i + 1, L + 1)
                if _allowed(i, j, breaks, residual)]
    forced = [p for p in range(L + 1) if not any(i < p < j for i, j in segments)]
    space = Space.merged(L, segments, act_free=free, forced=forced)
    return ModelSpace(arch, dict(m.spec.options), space, tuple(positions), tuple(breaks),
                      tuple(residual), dict(free))
