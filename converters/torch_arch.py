"""`arch.json`: a model's graph as data, so an export can be rebuilt without its builder.

A fused model (or one a method edited, e.g. DepthShrinker's added ReLU6) cannot
come back from `models.create`; its export therefore describes every layer:
its kind (class name), its `config()` (constructor arguments) and its inputs,
plus the spec and the activation masks. `net_from_arch` rebuilds the `Net`,
with the weights of a torch state dict (`model.safetensors`, a traced module's)
or fresh ones.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError
from models.layers import Act, Layer, Mask
from models.net import ModelSpec, Net

FORMAT = "jaxprune-export"
VERSION = 2   # 2: fused layers' border terms relative to the edges (FusedConv config)


def _mask_value(mask: np.ndarray):
    return float(mask) if mask.ndim == 0 else mask.tolist()


def arch_dict(m: Net) -> dict:
    """Everything but the weights: spec, graph (layer kinds and arguments), masks."""
    graph, masks = [], {}
    for name, inputs in m.graph:
        layer = m.layers[name]
        graph.append({"name": name, "inputs": list(inputs), "type": type(layer).__name__,
                      "config": layer.config()})
        if isinstance(layer, Act):
            mask = np.asarray(layer.mask.value)
            if not (mask.ndim == 0 and float(mask) == 1.0):
                masks[name] = _mask_value(mask)
    return {"format": FORMAT, "version": VERSION, **m.spec.as_dict(), "graph": graph,
            "masks": masks}


def _build(spec: dict, source: str, rngs: nnx.Rngs) -> Net:
    """The described `Net`, fresh weights."""
    layers, graph = {}, []
    kinds = Layer.kinds()
    for entry in spec["graph"]:
        kind = entry["type"]
        if kind not in kinds:
            raise UserError(f"{source}: unknown layer type {kind!r} for {entry['name']!r} "
                            f"(known: {sorted(kinds)})")
        layers[entry["name"]] = kinds[kind].from_config(dict(entry["config"]), rngs)
        graph.append((entry["name"], tuple(entry["inputs"])))
    model_spec = ModelSpec(spec["arch"], spec["num_classes"],
                           tuple(sorted(spec.get("options", {}).items())),
                           tuple(spec["input_size"]), spec.get("in_channels", 3))
    return Net(layers, tuple(graph), model_spec)


def with_weights(build: Callable[[], Net], state: dict, source: str) -> Net:
    """The model `build()` makes, holding the weights of the torch state dict `state` (every
    key and shape checked: `converters.load_state`).

    It is built without running its initialisers: on CPU, random initialisation compiles
    one program per weight shape (about 20 s for a ResNet-18), all thrown away here. The
    model is built as shapes, its weights are filled from `state` and its masks start at
    1; a model holding any other state (a dropout's random stream) is initialised as
    usual."""
    from converters.torch_in import load_state
    abstract = nnx.eval_shape(build)
    graphdef, weights, masks, rest = nnx.split(abstract, (nnx.Param, nnx.BatchStat), Mask, ...)
    if jax.tree.leaves(rest):
        return load_state(build(), state, source)
    fill = lambda value: lambda s: jnp.asarray(np.full(s.shape, value, s.dtype))  # noqa: E731
    m = nnx.merge(graphdef, jax.tree.map(fill(np.nan), weights), jax.tree.map(fill(1), masks),
                  rest)
    load_state(m, state, source)
    unset = [".".join(map(str, path)) for path, v in
             nnx.to_flat_state(nnx.state(m, (nnx.Param, nnx.BatchStat)))
             if np.isnan(np.asarray(v.get_value())).all()]
    if unset:
        raise UserError(f"{source}: the weights leave {unset[:3]} unset; a layer kind keeps "
                        f"state that its torch_state() does not list")
    return m


def net_from_arch(spec: dict, source: str = "arch.json", state: dict | None = None) -> Net:
    """The `Net` an `arch_dict` describes, with its masks set and the weights of `state`
    (a torch state dict, every key and shape checked: `converters.load_state`), or fresh
    weights without one."""
    if spec.get("format") != FORMAT or "graph" not in spec:
        raise UserError(f"{source}: not a jaxprune export description (no graph); re-export "
                        f"the model with converters.export")
    if spec.get("version", 0) > VERSION:
        raise UserError(f"{source}: export format version {spec['version']} is newer than this "
                        f"jaxprune reads ({VERSION}); update jaxprune")
    if spec.get("version", 0) < 2 and any(e["type"] == "FusedConv" for e in spec["graph"]):
        raise UserError(f"{source}: a fused model exported in format version "
                        f"{spec.get('version', 0)}, whose border data this jaxprune does not "
                        f"read; merge the linearized model again and re-export it")
    build = lambda: _build(spec, source, nnx.Rngs(0))  # noqa: E731
    m = build() if state is None else with_weights(build, state, source)
    for site, value in spec.get("masks", {}).items():
        m.layers[site].mask.value = jnp.asarray(value, jnp.float32)
    return m
