"""EASIER's ON/OFF entropy of activation sites, computed on device.

A site's pre-activation `z` is ON where `z >= 0`. Per mini-batch the
reference (DESIGN.md §5) takes `p` = the batch mean of ON at every position,
averages `p` over space (tokens for Swin), so one `p` per channel, then the
binary entropy in bits of each channel (log clamped at 1e-10) and the mean
over channels. A round's value is the mean of these per-batch values over the
epoch's batches (done by the trainer's accumulator).

Averaging over batch then space equals one mean over every axis but the last,
which is what an `Act` layer sows as `on_frac` when `record=True`; under a
sharded batch that mean is global, so the entropy does not depend on the
number of devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.net import Net

LOG_CLAMP = 1e-10  # the reference's torch.clamp(p, min=1e-10) inside log2


def binary_entropy(p):
    """Binary entropy in bits of ON-probabilities `p`, the reference's clamped form."""
    q = 1.0 - p
    return (-p * jnp.log2(jnp.maximum(p, LOG_CLAMP))
            - q * jnp.log2(jnp.maximum(q, LOG_CLAMP)))


def pop_entropies(m: Net, names: list[str]):
    """Per-batch entropy of each site in `names`, as a (len(names),) array, from the
    `on_frac` intermediates the last forward pass of `m` sowed; removes them from `m`
    (so its state keeps the structure it had before the pass)."""
    sown = nnx.pop(m, nnx.Intermediate)
    if not names:
        return jnp.zeros((0,), jnp.float32)
    on = [sown["layers"][n]["on_frac"].get_value()[0] for n in names]  # sow keeps a tuple
    return jnp.stack([jnp.mean(binary_entropy(p)) for p in on])


def recording_graphdef(m: Net, *, train: bool, record: bool):
    """The graph definition of `m` in train or eval mode with site statistics on or off.

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


@jax.jit
def _forward_entropy(graphdef, state, x):
    m = nnx.merge(graphdef, state)
    m(x)
    return pop_entropies(m, m.sites())


def site_entropy(m: Net, x) -> dict[str, float]:
    """`{site: H}` (bits) of one batch `x` (NHWC) in train mode: batch statistics,
    dropout on. `m` is left unchanged (running statistics, mode, masks)."""
    graphdef = recording_graphdef(m, train=True, record=True)
    values = np.asarray(_forward_entropy(graphdef, nnx.state(m), jnp.asarray(x)))
    return dict(zip(m.sites(), values.tolist()))
