"""`arch.json`: a model's graph as data, so an export can be rebuilt without its builder.

A fused model (or one a method edited, e.g. DepthShrinker's added ReLU6) cannot
come back from `models.create`; its export therefore describes every layer:
its kind (class name), its `config()` (constructor arguments) and its inputs,
plus the spec and the activation masks. `net_from_arch` rebuilds the `Net`
(fresh weights; `converters.from_torch` then loads `model.safetensors` into it).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError
from models.layers import Act, Layer
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


def net_from_arch(spec: dict, source: str = "arch.json") -> Net:
    """The `Net` an `arch_dict` describes, with fresh weights and its masks set."""
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
    layers, graph = {}, []
    rngs = nnx.Rngs(0)
    kinds = Layer.kinds()
    for entry in spec["graph"]:
        kind = entry["type"]
        if kind not in kinds:
            raise UserError(f"{source}: unknown layer type {kind!r} for {entry['name']!r} "
                            f"(known: {sorted(kinds)})")
        layers[entry["name"]] = kinds[kind].from_config(dict(entry["config"]), rngs)
        graph.append((entry["name"], tuple(entry["inputs"])))
    for site, value in spec.get("masks", {}).items():
        layers[site].mask.value = jnp.asarray(value, jnp.float32)
    model_spec = ModelSpec(spec["arch"], spec["num_classes"],
                           tuple(sorted(spec.get("options", {}).items())),
                           tuple(spec["input_size"]), spec.get("in_channels", 3))
    return Net(layers, tuple(graph), model_spec)
