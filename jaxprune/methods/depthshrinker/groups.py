"""DepthShrinker's gate groups: which sites each gate switches, and which layers it lets fuse.

A *group* is one gate: the stem's activations (before the first block), the
depthwise-separable block's, one shared gate per inverted residual (both its
activations), the head's (after the last block); N = 19 on MobileNetV2, 18 on
EfficientNet-Lite0. The blocks come from the model (`models.blocks`), so any
inverted-residual network that declares them has gates.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
from flax import nnx

import models
from models.net import INPUT, ModelSpec, Net


@dataclasses.dataclass(frozen=True)
class Group:
    """One gate: its sites, the layers it lets fuse, and where a removed block's ReLU6 goes."""
    index: int
    sites: tuple[str, ...]
    nodes: tuple[str, ...]   # the graph region (stem, block or head) in graph order
    input: str               # the tensor that feeds the region
    final: str | None        # an inverted residual's output (after its add); None otherwise
    block: str | None        # the block's torch module path; None for the stem and the head


def groups(m: Net) -> list[Group]:
    """The gates of `m`, in forward order (see the module doc)."""
    blocks = models.blocks(m)
    order = [n for n, _ in m.graph]
    pos = {INPUT: -1, **{n: i for i, n in enumerate(order)}}
    sites = m.sites()
    stem = tuple(s for s in sites if pos[s] <= pos[blocks[0].input])
    head = tuple(s for s in sites if pos[s] > pos[blocks[-1].output])
    head_end = head[-1] if head else blocks[-1].output
    spans = ([(INPUT, blocks[0].input, stem, None)]
             + [(b.input, b.output, b.sites, b) for b in blocks]
             + [(blocks[-1].output, head_end, head, None)])
    out = []
    for src, end, group_sites, block in spans:
        if not group_sites:
            continue
        # a removed inverted residual (expansion and depthwise sites) gets a final ReLU6
        final = block.output if block is not None and len(block.sites) > 1 else None
        nodes = tuple(order[pos[src] + 1:pos[end] + 1])
        out.append(Group(len(out), tuple(group_sites), nodes, src, final,
                         None if block is None else block.prefix))
    return out


def final_act_name(g: Group) -> str:
    """The name of the ReLU6 a removed inverted residual gets after its output."""
    return f"{g.block}.final_act"


def set_group_masks(m: Net, gs: Sequence[Group], values) -> None:
    """Write one mask value per group into all its sites (traced or not)."""
    for g in gs:
        for s in g.sites:
            var = m.layers[s].mask
            var.set_value(jnp.broadcast_to(values[g.index], var.get_value().shape))


def region_net(m: Net, g: Group, shapes: dict[str, tuple]) -> Net:
    """The layers of group `g` as a model of their own (copies), input = the region's input."""
    inputs = dict(m.graph)
    layers = {n: nnx.clone(m.layers[n]) for n in g.nodes}
    graph = tuple((n, tuple(INPUT if i == g.input else i for i in inputs[n])) for n in g.nodes)
    _, h, w, c = shapes[g.input]
    spec = ModelSpec(m.spec.arch, m.spec.num_classes, m.spec.options, (h, w), c)
    return Net(layers, graph, spec)
