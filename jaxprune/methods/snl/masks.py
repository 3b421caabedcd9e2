"""SNL's masks: α's shape per site, the ReLUs each α covers, counting and binarizing them."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxprune.activation_sites import site_sizes
from jaxprune.errors import UserError
from jaxprune.merging.profiling import tensor_shapes
from jaxprune.methods.snl import GRANULARITIES
from models.net import Net


def mask_shapes(m: Net, hw, granularity: str) -> dict[str, tuple]:
    """α's shape per site: (C,) or (H, W, C) of the site's input at input size `hw`."""
    if granularity not in GRANULARITIES:
        raise UserError(f"method.granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    shapes = tensor_shapes(m, tuple(hw))
    inputs = dict(m.graph)
    out = {}
    for site in m.sites():
        shape = shapes[inputs[site][0]][1:]
        if len(shape) != 3:
            raise UserError(f"snl needs (H, W, C) activations; site {site} has shape {shape}")
        out[site] = shape[-1:] if granularity == "channel" else shape
    return out


def relu_weights(m: Net, hw, shapes: dict[str, tuple]) -> dict[str, int]:
    """How many activations one α covers at each site (H·W per channel α, 1 per pixel α)."""
    counts = site_sizes(m, hw, list(shapes))
    return {s: counts[s] // int(np.prod(shapes[s])) for s in shapes}


def relu_count(alphas: dict[str, np.ndarray], weights: dict[str, int], threshold: float) -> int:
    """ReLUs per image kept by `alphas`: Σ [α > threshold] · (activations per α)."""
    return int(sum(int(np.sum(np.asarray(a) > threshold)) * weights[s] for s, a in alphas.items()))


def binarize(alphas: dict[str, np.ndarray], weights: dict[str, int], threshold: float,
             budget: int) -> tuple[dict[str, np.ndarray], bool]:
    """0/1 masks: α > threshold; when that keeps more than `budget` ReLUs, the largest α
    whose ReLUs fit in the budget instead. Returns (masks, whether the budget forced it)."""
    masks = {s: (np.asarray(a) > threshold).astype(np.float32) for s, a in alphas.items()}
    if relu_count(alphas, weights, threshold) <= budget:
        return masks, False
    sites = list(alphas)
    values = np.concatenate([np.asarray(alphas[s], np.float64).ravel() for s in sites])
    cost = np.concatenate([np.full(np.asarray(alphas[s]).size, weights[s]) for s in sites])
    order = np.argsort(-values, kind="stable")
    order = order[values[order] > threshold]
    chosen = order[np.cumsum(cost[order]) <= budget]
    flat = np.zeros(values.size, np.float32)
    flat[chosen] = 1.0
    out, start = {}, 0
    for s in sites:
        size = np.asarray(alphas[s]).size
        out[s] = flat[start:start + size].reshape(np.asarray(alphas[s]).shape)
        start += size
    return out, True


def set_masks(m: Net, masks: dict[str, np.ndarray]) -> None:
    for site, value in masks.items():
        m.layers[site].mask.set_value(jnp.asarray(value, jnp.float32))
