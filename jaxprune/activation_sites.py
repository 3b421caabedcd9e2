"""Activation sites: list them, linearize them, record their ON statistics, count them."""
from __future__ import annotations

from typing import Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError, closest
from models.layers import Act
from models.net import Net


def sites(m: Net) -> list[str]:
    """Names of every activation site of `m`, in forward order."""
    return m.sites()


def site(m: Net, name: str) -> Act:
    """The `Act` layer of site `name`; an unknown name lists the closest valid ones."""
    layer = m.layers.get(name) if name in m.layers else None
    if not isinstance(layer, Act):
        raise UserError(f"unknown activation site {name!r}; {closest(name, m.sites())}")
    return layer


def linearize(m: Net, names: Iterable[str]) -> Net:
    """Make the named sites identities (mask 0), in place. Returns `m` for chaining."""
    layers = [site(m, n) for n in names]  # validate every name before changing anything
    for layer in layers:
        layer.mask.value = jnp.zeros_like(layer.mask.value)
    return m


def dense_copy(m: Net) -> Net:
    """A copy of `m` with every site nonlinear again (mask 1): the architecture as built."""
    out = nnx.clone(m)
    for n in out.sites():
        out.layers[n].mask.value = jnp.ones_like(out.layers[n].mask.value)
    return out


def linearized(m: Net) -> list[str]:
    """Sites whose mask is entirely 0 (identity), in forward order."""
    return [n for n in m.sites() if not bool(jnp.any(m.layers[n].mask.value != 0))]


def recording_graphdef(m: Net, *, train: bool, record: bool):
    """The graph definition of `m` in train or eval mode with its sites recording their ON
    fractions (`on_frac`, see `models.layers.Act`) or not.

    Mode and recording are static attributes, so each combination is its own
    graphdef (its own compiled function); the state of `m` fits all of them.
    """
    view = nnx.clone(m)
    if train:
        view.train()
    else:
        view.eval()
    for n in view.sites():
        view.layers[n].record = record
    return nnx.graphdef(view)


def pop_on_fractions(m: Net, names: list[str]) -> list:
    """The per-channel ON fractions (C,) each site in `names` sowed in the last forward pass
    of `m`; removes every sown value from `m`, so its state keeps the structure it had
    before the pass."""
    sown = nnx.pop(m, nnx.Intermediate)
    return [sown["layers"][n]["on_frac"].get_value()[0] for n in names]  # sow keeps a tuple


def site_sizes(m: Net, hw: tuple[int, int], names: Iterable[str] | None = None) -> dict[str, int]:
    """Activations per image at each site (its pre-activation's size) for inputs of `hw`:
    what a site's nonlinearity costs in private inference, one protocol step each."""
    from jaxprune.merging.profiling import tensor_shapes
    shapes = tensor_shapes(m, tuple(hw))
    inputs = dict(m.graph)
    names = m.sites() if names is None else names
    return {n: int(np.prod(shapes[inputs[n][0]][1:])) for n in names}
