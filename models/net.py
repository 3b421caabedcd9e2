"""`Net`: a model as an ordered graph of named layers.

Every jaxprune model is a `Net`. Its `graph` is a tuple of `(name, inputs)` in
execution order; `inputs` name earlier layers, or `"input"` for the image.
The last entry is the output. Keeping the model as data (rather than a
hand-written forward) is what lets one generic pass merge any model, export it
to torch, count its MACs and convert its weights.

Build a Net with `GraphBuilder`:

    b = GraphBuilder()
    h = b.add("conv1", Conv(...))           # input defaults to the previous layer
    h = b.add("bn1", BatchNorm(64))
    b.add("add", Add(), inputs=(h, "input"))
    net = b.build(spec)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError
from models.layers import Act, BatchNorm, Layer

INPUT = "input"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What `models.create` needs to rebuild this architecture (static metadata).

    `options` is a sorted tuple of (key, value) pairs, so the spec is hashable.
    `input_size` is the native (H, W) of the model.
    """
    arch: str
    num_classes: int
    options: tuple[tuple[str, Any], ...] = ()
    input_size: tuple[int, int] = (32, 32)
    in_channels: int = 3

    def as_dict(self) -> dict:
        return {"arch": self.arch, "num_classes": self.num_classes,
                "options": dict(self.options), "input_size": list(self.input_size),
                "in_channels": self.in_channels}


@dataclasses.dataclass(frozen=True)
class Block:
    """One residual block of a built model, as block-wise methods see it."""
    prefix: str                # torch module path of the block (features.5, blocks.2.1)
    sites: tuple[str, ...]     # its activation sites in order: (expand, depthwise) of an
                               # inverted residual, (depthwise,) of a depthwise-separable block
    add: str | None            # the residual Add layer, None without a residual
    input: str                 # the layer that feeds the block
    output: str                # the block's last layer (the Add, or the projection's BN)


def size_refusal(rule: tuple[str, tuple[int, int]], h: int, w: int) -> str | None:
    """Why an (h, w) input is refused by a model whose `Net.input_sizes()` is `rule`
    (None: it runs). The merged model's border terms hold from its smallest size on
    (kind "min"), or at one size only ("fixed"); below the smallest the original network
    itself may have no output (pooled to nothing)."""
    kind, (mh, mw) = rule
    if kind == "fixed" and (h, w) != (mh, mw):
        return f"this merged model was fused for {mh}x{mw} inputs, got {h}x{w}: use that size"
    if kind == "min" and (h < mh or w < mw):
        return (f"this merged model runs at inputs of at least {mh}x{mw}, got {h}x{w}: use a "
                f"larger input")
    return None


class Net(nnx.Module):
    """A model: `layers[name]` executed in `graph` order. NHWC in, logits out."""

    def __init__(self, layers: dict[str, Layer], graph: tuple[tuple[str, tuple[str, ...]], ...],
                 spec: ModelSpec):
        self.layers = nnx.Dict(layers)
        self.graph = tuple((n, tuple(i)) for n, i in graph)
        self.spec = spec

    def __call__(self, x):
        rule = self.input_sizes()
        if rule is not None and (why := size_refusal(rule, *x.shape[1:3])):
            raise UserError(f"{why}, or merge the linearized model for your input size: "
                            f"jaxprune.merge(m, input_size=(H, W))")
        env = {INPUT: x}
        for name, inputs in self.graph:
            env[name] = self.layers[name](*(env[i] for i in inputs))
        return env[self.graph[-1][0]]

    def named_layers(self) -> Iterator[tuple[str, Layer]]:
        for name, _ in self.graph:
            yield name, self.layers[name]

    def input_sizes(self) -> tuple[str, tuple[int, int]] | None:
        """The input sizes this model runs at when a layer restricts them (a fused
        model's border terms): ("fixed", (H, W)) or ("min", (H, W)); None: any size."""
        rules = [r for _, layer in self.named_layers() if (r := layer.input_sizes()) is not None]
        for kind, size in rules:
            if kind == "fixed":
                return kind, tuple(size)
        if not rules:
            return None
        return "min", tuple(max(size[a] for _, size in rules) for a in (0, 1))

    def sites(self) -> list[str]:
        return [n for n, layer in self.named_layers() if isinstance(layer, Act)]

    def insert_after(self, after: str, name: str, layer: Layer) -> str:
        """Insert `layer` as `name` right after layer `after`, in place: it reads `after`
        and every layer that read `after` reads it instead (a new graph, so a new
        graph definition: do it before compiling steps). Returns `name`."""
        order = [n for n, _ in self.graph]
        if after not in order:
            raise ValueError(f"no layer {after!r} to insert after")
        if name in self.layers or name == INPUT:
            raise ValueError(f"duplicate layer name {name!r}")
        graph = []
        for n, inputs in self.graph:
            graph.append((n, tuple(name if i == after else i for i in inputs)))
            if n == after:
                graph.append((name, (after,)))
        self.layers[name] = layer
        self.graph = tuple(graph)
        return name

    def remove(self, name: str) -> None:
        """Remove layer `name` in place, making it the identity: every layer that read it
        reads its one input instead (a new graph, so a new graph definition: do it before
        compiling steps). The caller keeps the shapes valid: the layer's output must have
        its input's shape. Raises `ValueError` for an unknown layer, the model's output, or
        a layer of several inputs."""
        inputs = dict(self.graph).get(name)
        if inputs is None:
            raise ValueError(f"no layer {name!r} to remove")
        if name == self.graph[-1][0]:
            raise ValueError(f"{name!r} is the model's output; it cannot be removed")
        if len(inputs) != 1:
            raise ValueError(f"{name!r} reads {len(inputs)} tensors; only a layer of one "
                             "input can become the identity")
        self.graph = tuple((n, tuple(inputs[0] if i == name else i for i in ins))
                           for n, ins in self.graph if n != name)
        del self.layers[name]

    def dummy_input(self, batch: int = 1, size: tuple[int, int] | None = None):
        h, w = size or self.spec.input_size
        return jnp.zeros((batch, h, w, self.spec.in_channels), jnp.float32)


class GraphBuilder:
    """Collects `(name, layer, inputs)` in order and builds a `Net`."""

    def __init__(self):
        self.layers: dict[str, Layer] = {}
        self.graph: list[tuple[str, tuple[str, ...]]] = []

    @property
    def last(self) -> str:
        return self.graph[-1][0] if self.graph else INPUT

    def add(self, name: str, layer: Layer, inputs: str | tuple[str, ...] | None = None) -> str:
        if name in self.layers or name == INPUT:
            raise ValueError(f"duplicate layer name {name!r}")
        if inputs is None:
            inputs = (self.last,)
        elif isinstance(inputs, str):
            inputs = (inputs,)
        for i in inputs:
            if i != INPUT and i not in self.layers:
                raise ValueError(f"layer {name!r} reads {i!r}, which is not defined before it")
        self.layers[name] = layer
        self.graph.append((name, tuple(inputs)))
        return name

    def build(self, spec: ModelSpec) -> Net:
        return Net(self.layers, tuple(self.graph), spec)


def randomize_bn(m: Net, seed: int = 0) -> Net:
    """Random, non-trivial BatchNorm statistics and affine parameters, in place.

    Fresh models have mean 0 / var 1 / scale 1 / bias 0, under which a wrong
    BN fold or a wrong border bias goes unnoticed; parity tests and benchmarks
    use this instead."""
    rng = np.random.default_rng(seed)
    for _, layer in m.named_layers():
        if isinstance(layer, BatchNorm):
            c = layer.num_features
            layer.mean.value = jnp.asarray(rng.normal(size=c) * 0.5, jnp.float32)
            layer.var.value = jnp.asarray(rng.uniform(0.5, 2.0, size=c), jnp.float32)
            layer.scale.value = jnp.asarray(rng.uniform(0.5, 1.5, size=c), jnp.float32)
            layer.bias.value = jnp.asarray(rng.normal(size=c) * 0.3, jnp.float32)
    return m
