"""Data parallelism (DESIGN.md §2): a 1-D `('data',)` mesh over every device, the
batch sharded `P('data')`, parameters and optimizer state replicated `P()`.
BatchNorm statistics are then global (SyncBN) with no extra code: XLA inserts
the all-reduces. Multi-host runs call `jax.distributed.initialize()` first;
`jax.devices()` then lists every process's devices.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D `('data',)` mesh over `devices` (default: all devices of all processes).

    Auto axis types: sharding is propagated by the compiler, so model code
    stays free of sharding annotations.
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
    """`tree` copied to every device of `mesh` (a no-op for arrays already there)."""
    return jax.device_put(tree, replicated(mesh))


def fetch(tree):
    """Host NumPy copy of a replicated pytree (works on every process of a multi-host run)."""
    return jax.tree.map(np.asarray, jax.device_get(tree))
