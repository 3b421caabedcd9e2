"""Activation sites: list them, linearize them, read and set their masks."""
from __future__ import annotations

from typing import Iterable

import jax.numpy as jnp

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


def linearized(m: Net) -> list[str]:
    """Sites whose mask is entirely 0 (identity), in forward order."""
    return [n for n in m.sites() if not bool(jnp.any(m.layers[n].mask.value != 0))]


def set_record(m: Net, on: bool) -> None:
    """Switch per-site ON statistics (`on_frac` intermediates) on or off."""
    for n in m.sites():
        m.layers[n].record = on
