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

Beyond the papers (`strided_blocks=True`): a residual block with a break inside (ResNet's
downsampling blocks: a strided conv1, a 1x1 strided shortcut conv) may also be one segment
as a whole. `jaxprune.merge` composes strides exactly, and the shortcut conv folds into
the centre tap of the merged kernel, as an identity does. With layer dropping its second
conv may then be dropped, the block becoming one strided 3x3 conv.

Activations: a position whose conv is followed by an activation site keeps it when it is
a boundary (a = 1) and loses it (linearized) when it lies strictly inside a segment.
MobileNetV2's block ends have no activation: they are the *free* positions (ECDC's
a in {0, 1}), where a plan may insert a ReLU6 after the block's output, as DepthShrinker
does after a removed block (`Net.insert_after`).

Layer dropping (`drop_layers=True`, LayerMerge, Kim et al., ICML 2024; the rules of its
reference code): a searched conv is *droppable* when it keeps its input's shape (as many
output channels as input, stride 1) and is wider than 1x1: every 3x3 conv of a ResNet
BasicBlock but the strided conv1 of stages 2-4, every stride-1 depthwise conv of
MobileNetV2 (features.1's included, as in the reference's published plan); the others are
*irreducible*. (The papers' 1x1 convs all change width; leaving them out keeps the space
the same at any width.) A dropped conv becomes the identity: the conv and its BatchNorm are
removed, the residual add stays (a branch that lost every conv adds x to x). Each segment
then has one option per (kernel, stride, depthwise) of the conv it merges into, keyed
"k{kernel}s{stride}d" or "...dw": per class of convs (kernel size, depthwise) a count from
its irreducible convs to all of them, at least one conv in all; the kernel is composed
exactly (`option_key`: 1 + sum of count x (size - 1) within the papers' breaks), the
stride the product of the strides, depthwise when every kept conv is. Two counts of one
key: the later in product order (more convs kept) stands.
Each option keeps one fixed set of convs, chosen before the search from the model's
weights: the irreducible ones and, per class, the droppable ones of largest L1 norm of
their raw kernel (ties: the earlier conv), which maximises the summed L1 norm of the kept
convs, as the reference picks its subsets. There is no ECDC stage 1 (T_opt): every
segment runs as one merged layer. Activations: ResNet keeps every boundary's activation;
MobileNetV2's block ends take no free flag: a ReLU6 is inserted after a block end that
ends a segment of two or more convs, and a single-conv segment ending there stays linear
(`ModelSpace.end_acts`).

`build_space(m, drop_layers=...)` gives a `ModelSpace`: the pure `dp.Space` for the
search, the positions with their layers, and `edits(plan)`, what a `dp.Plan` changes: the
sites to linearize, the activations to insert, the convs to drop and the tensors to keep
(`merge(..., cuts=...)`), so that the merged model runs exactly the plan's pieces. Supported:
`resnet18_cifar`, `resnet18`, `resnet34`,
`mobilenet_v2` (either layout, any width), `mobilenet_v2_cifar`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Mapping

import jax
import numpy as np

from jaxprune.errors import UserError, closest
from jaxprune.methods.layermerge.dp import Plan, SearchError, Space
from jaxprune.merging.regions import GraphInfo
from models.layers import Act, BatchNorm, Conv
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
class ConvFacts:
    """What layer dropping needs of a searched conv: its kernel size, stride, whether it
    is depthwise, whether it may be dropped, and the L1 norm of its raw kernel."""
    kernel: int
    stride: int
    depthwise: bool
    droppable: bool
    l1: float

    @property
    def cls(self) -> tuple[int, bool]:
        return self.kernel, self.depthwise


def option_key(facts: list[ConvFacts]) -> str:
    """The option a chain of kept convs (in order) merges into: "k{kernel}s{stride}d"
    (dense) or "...dw" (every kept conv depthwise). Composed exactly: each conv widens the
    kernel by (its size - 1) times the product of the strides before it, and the strides
    multiply. (The papers' 1 + sum (size - 1) is the same wherever their breaks leave
    only 1x1 convs after a stride.)"""
    kernel, stride = 1, 1
    for f in facts:
        kernel, stride = kernel + (f.kernel - 1) * stride, stride * f.stride
    return f"k{kernel}s{stride}{'dw' if all(f.depthwise for f in facts) else 'd'}"


@dataclasses.dataclass(frozen=True)
class Edits:
    """What a plan changes in the model: `linearize` (site names), `insert_act`
    ({new activation name: the layer it follows}), `drop` (convs that become the
    identity, with their BatchNorm) and `cuts` (layer names whose outputs stay
    materialized when merging: the plan's pieces)."""
    linearize: tuple[str, ...]
    insert_act: Mapping[str, str]
    cuts: tuple[str, ...]
    drop: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"linearize": list(self.linearize), "insert_act": dict(self.insert_act),
                "drop": list(self.drop), "cuts": list(self.cuts)}


@dataclasses.dataclass(frozen=True)
class ModelSpace:
    """The search space of one model: `space` (for `dp.solve`), `positions` (0..L),
    `breaks`, `residual` ((src, tgt) per residual block), `free_after` ({free position:
    (the layer an inserted activation follows, the inserted activation's name)}); with
    `drop_layers`, `conv_facts` ({searched conv: its `ConvFacts`}) and `keep` ({(i, j, option):
    the convs that option keeps}); `strided_blocks`, whether a residual block with a break
    inside may be one segment."""
    arch: str
    options: Mapping
    space: Space
    positions: tuple[Position, ...]
    breaks: tuple[int, ...]
    residual: tuple[tuple[int, int], ...]
    free_after: Mapping[int, tuple[str, str]]
    drop_layers: bool = False
    conv_facts: Mapping[str, ConvFacts] = dataclasses.field(default_factory=dict)
    keep: Mapping[tuple[int, int, str], tuple[str, ...]] = dataclasses.field(default_factory=dict)
    strided_blocks: bool = False

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
        if self.drop_layers:  # (the kept subsets hang on the weights: not in the hash)
            data["drop_layers"] = {f"{i},{j}": list(o) for (i, j), o in self.space.options.items()}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def convs(self, i: int, j: int) -> tuple[str, ...]:
        """The convs segment (i, j) merges."""
        return tuple(p.conv for p in self.positions[i + 1:j + 1])

    def entries(self) -> tuple[tuple[int, int, str], ...]:
        """Every (i, j, option) of the space: what the latency table times."""
        return tuple((i, j, o) for (i, j), opts in self.space.options.items() for o in opts)

    def dropped(self, i: int, j: int, option: str) -> tuple[str, ...]:
        """The convs of segment (i, j) that `option` drops (none in an ECDC space)."""
        if not self.drop_layers:
            return ()
        kept = set(self.keep[(i, j, option)])
        return tuple(c for c in self.convs(i, j) if c not in kept)

    def end_acts(self, i: int, j: int) -> tuple[int, ...]:
        """The activation flags segment (i, j) may leave at its end: ECDC: (0, 1) at a free
        position, else (1,); LayerMerge: at a free position (a MobileNetV2 block end) 1
        iff the segment merges two or more convs (a ReLU6 inserted), else (1,)."""
        if self.drop_layers and j in self.free_after:
            return (1,) if j - i >= 2 else (0,)
        return self.space.acts(j)

    def act_keys(self, i: int, j: int, option: str) -> list[tuple]:
        """The DP's keys (i, j, option, a_i, a_j) of one segment option: every flag a_i the
        search may arrive with at i, every flag `end_acts` allows at j."""
        return [(i, j, option, ai, aj) for ai in self.space.acts(i)
                for aj in self.end_acts(i, j)]

    def _checked_drops(self, plan: Plan, drop) -> tuple[str, ...]:
        """`drop` (a replayed plan's convs) checked against the plan's options: each one a
        droppable conv of the space, and each segment keeping what its option merges."""
        if not self.drop_layers:
            if drop:
                raise SearchError(f"the plan drops convs ({drop[0]!r}, ...) but this space "
                                  "has no layer dropping: set method.drop_layers to true")
            return ()
        drop = list(drop)
        for c in drop:
            if c not in self.conv_facts:
                raise SearchError(f"the plan drops {c!r}, not a searched conv of "
                                  f"{self.arch}; {closest(c, list(self.conv_facts))}")
            if not self.conv_facts[c].droppable:
                raise SearchError(f"the plan drops {c!r}, an irreducible conv (it changes its "
                                  "input's shape, or is 1x1): give a plan that keeps it")
        for s in plan.segments:
            kept = [c for c in self.convs(s.start, s.end) if c not in drop]
            if not kept or option_key([self.conv_facts[c] for c in kept]) != s.option:
                raise SearchError(f"the plan's segment ({s.start}, {s.end}) keeps {kept}, "
                                  f"which does not merge into its option {s.option!r}: give "
                                  "a plan a layermerge run wrote")
        return tuple(c for p in self.positions if (c := p.conv) in drop)

    def edits(self, plan: Plan, pieces: Mapping[tuple[int, int], tuple[int, ...]] | None = None,
              drop=None) -> Edits:
        """What `plan` changes (see `Edits`). `pieces`: {(i, j): (i, b1, ..., j)}, how a
        chosen segment runs (ECDC's T_opt breaks, `dp.t_opt`); default: merged whole.
        `drop`: the convs a replayed plan drops (checked); default: those its options drop.
        Raises `SearchError` for a plan of another length, with a segment or option the
        space does not allow, or dropping a conv it may not."""
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
                                  "plan made for this model (method.strided_blocks)")
            if s.option not in self.space.options[seg]:
                raise SearchError(f"the plan's segment {seg} runs as {s.option!r}, not one of "
                                  f"its options {self.space.options[seg]}: give a plan made "
                                  "for this model's space (method.drop_layers)")
            if int(s.act_end) not in self.end_acts(*seg):
                raise SearchError(f"the plan {'keeps' if s.act_end else 'drops'} the "
                                  f"activation at position {s.end}, which segment {seg} "
                                  "does not allow: give a plan made for this model's space")
            inner = tuple(pieces.get(seg, seg))
            if inner[0] != s.start or inner[-1] != s.end or list(inner) != sorted(set(inner)):
                raise SearchError(f"pieces {inner} of segment {seg} do not run from "
                                  f"{s.start} to {s.end}")
            cut.update(inner)
            linear += [p.site for p in self.positions[s.start + 1:s.end] if p.site]
            if s.end in self.free_after and s.act_end:
                after, name = self.free_after[s.end]
                insert[name] = after
        # a kept activation cuts by itself; the linear positions among the cuts are named
        kept = {p for p in cut if (self.positions[p].site and self.positions[p].site not in
                                   linear) or (p in self.free_after and self.free_after[p][1]
                                               in insert)}
        cuts = tuple(self.positions[p].tensor for p in sorted(cut - kept))
        if drop is None:
            drop = [c for s in plan.segments for c in self.dropped(s.start, s.end, s.option)]
        return Edits(tuple(linear), insert, cuts, self._checked_drops(plan, drop))


def drop_conv(m: Net, conv: str) -> None:
    """Make `conv` the identity in `m`, in place: the conv and the BatchNorm that reads it
    are removed (`Net.remove`), a residual add after them stays. Raises `UserError` for a
    conv `m` lacks (with the closest) or one whose output is not its input's shape."""
    layer = m.layers.get(conv)
    if not isinstance(layer, Conv):
        convs = [n for n, x in m.named_layers() if isinstance(x, Conv)]
        raise UserError(f"cannot drop {conv!r}: not a conv of the model; {closest(conv, convs)}")
    if layer.cin != layer.cout or layer.stride != (1, 1) or any(
            a + b != k - 1 for (a, b), k in zip(layer.padding, layer.kernel_size)):
        raise UserError(f"cannot drop {conv!r}: its output is not its input's shape")
    bn = conv_bn(m, conv)
    m.remove(conv)
    if bn is not None:
        m.remove(bn)


def conv_bn(m: Net, conv: str) -> str | None:
    """The BatchNorm that alone reads `conv` (its own, folded into it when merging), or
    None."""
    readers = [n for n, ins in m.graph if conv in ins]
    if len(readers) == 1 and isinstance(m.layers[readers[0]], BatchNorm):
        return readers[0]
    return None


def apply_edits(m: Net, edits: Edits) -> Net:
    """`m` with `edits` applied, in place: the activations inserted (nonlinear), the convs
    dropped (`drop_conv`) and the sites linearized. Raises `UserError` for a site or layer
    `m` lacks (with the closest)."""
    from jaxprune.activation_sites import linearize
    for name, after in edits.insert_act.items():
        if name not in m.layers:
            if after not in m.layers:
                raise UserError(f"cannot insert {name!r}: the model has no layer {after!r}")
            m.insert_after(after, name, Act(INSERTED_ACT))
    for conv in edits.drop:
        drop_conv(m, conv)
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


def _allowed(i: int, j: int, breaks, residual, strided_blocks: bool) -> bool:
    if any(i < b < j for b in breaks) and not (strided_blocks and (i, j) in residual):
        return False
    return not any(i < s < j < t or s < i < t < j for s, t in residual)


def _conv_facts(m: Net, conv: str) -> ConvFacts:
    layer = m.layers[conv]
    kernel = layer.kernel.value
    if not isinstance(kernel, (np.ndarray, jax.Array)):
        raise UserError("layer dropping picks the convs each option keeps by their weights: "
                        "build the space from a model with weights, not its shapes")
    kh, kw = layer.kernel_size
    depthwise = layer.groups == layer.cin == layer.cout and layer.groups > 1
    stride = int(max(layer.stride))
    droppable = layer.cin == layer.cout and stride == 1 and kh * kw > 1
    return ConvFacts(kh, stride, depthwise, droppable, float(np.abs(np.asarray(kernel)).sum()))


def _options(names: tuple[str, ...], facts: Mapping[str, ConvFacts]) -> dict[str, tuple[str, ...]]:
    """{option key: the convs it keeps} of one segment's convs (see the module doc)."""
    classes: dict[tuple[int, bool], list[str]] = {}
    for c in names:
        classes.setdefault(facts[c].cls, []).append(c)
    # per class: its irreducible convs, then its droppable ones by L1 norm (largest first)
    ranked = {k: sorted(cs, key=lambda c: (facts[c].droppable, -facts[c].l1, names.index(c)))
              for k, cs in classes.items()}
    counts = [range(sum(not facts[c].droppable for c in cs), len(cs) + 1)
              for cs in classes.values()]
    out: dict[str, tuple[str, ...]] = {}
    for n in itertools.product(*counts):
        kept = {c for cs, k in zip(ranked.values(), n) for c in cs[:k]}
        if kept:
            out[option_key([facts[c] for c in names if c in kept])] = tuple(
                c for c in names if c in kept)
    return out


def build_space(m: Net, *, drop_layers: bool = False,
                strided_blocks: bool = False) -> ModelSpace:
    """The search space of `m` (see the module doc), built from its graph: ECDC's, or
    LayerMerge's with `drop_layers` (which reads `m`'s conv weights); `strided_blocks`
    also lets a residual block with a break inside be one segment (see the module doc).
    Raises `UserError` for a model outside `SUPPORTED`, or a model without weights when
    dropping."""
    arch = m.spec.arch
    if arch not in SUPPORTED:
        raise UserError(f"layermerge has search-space rules for {list(SUPPORTED)}, not "
                        f"{arch!r}: pick one of them for model.name")
    if dict(m.spec.options).get("fused"):
        raise UserError("layermerge searches an unfused model; this one was merged already")
    positions, residual, breaks, free = _positions(m, _blocks(m))
    L = len(positions) - 1
    segments = [(i, j) for i in range(L) for j in range(i + 1, L + 1)
                if _allowed(i, j, breaks, residual, strided_blocks)]
    forced = [p for p in range(L + 1) if not any(i < p < j for i, j in segments)]
    facts, keep = {}, {}
    if drop_layers:
        facts = {p.conv: _conv_facts(m, p.conv) for p in positions[1:]}
        options = {}
        for i, j in segments:
            names = tuple(p.conv for p in positions[i + 1:j + 1])
            opts = _options(names, facts)
            options[(i, j)] = tuple(opts)
            keep.update({(i, j, o): kept for o, kept in opts.items()})
        space = Space(L, options, frozenset(free), frozenset(forced))
    else:
        space = Space.merged(L, segments, act_free=free, forced=forced)
    return ModelSpace(arch, dict(m.spec.options), space, tuple(positions), tuple(breaks),
                      tuple(residual), dict(free), drop_layers, facts, keep, strided_blocks)
