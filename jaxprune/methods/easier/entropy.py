"""EASIER's ON/OFF entropy of activation sites, computed on device (DESIGN.md §5).

A site's pre-activation `z` is ON where `z >= 0`. Per mini-batch the
reference takes `p` = the batch mean of ON at every position, averages `p`
over space (tokens for Swin), so one `p` per channel, then the binary entropy
in bits of each channel (log clamped at 1e-10) and the mean over channels. A
round's value is the mean of these per-batch values over the epoch's batches
(the trainer's accumulator, through `EntropyHooks`).

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

from jaxprune.activation_sites import pop_on_fractions, recording_graphdef
from models.net import Net

LOG_CLAMP = 1e-10  # the reference's torch.clamp(p, min=1e-10) inside log2


def binary_entropy(p):
    """Binary entropy in bits of ON-probabilities `p`, the reference's clamped form."""
    q = 1.0 - p
    return (-p * jnp.log2(jnp.maximum(p, LOG_CLAMP))
            - q * jnp.log2(jnp.maximum(q, LOG_CLAMP)))


def layer_entropy(on_frac):
    """One site's entropy (bits) from its per-channel ON fractions (C,): the channel mean."""
    return jnp.mean(binary_entropy(on_frac))


@jax.jit
def _forward_entropy(graphdef, state, x):
    m = nnx.merge(graphdef, state)
    m(x)
    return jnp.stack([layer_entropy(p) for p in pop_on_fractions(m, m.sites())])


def site_entropy(m: Net, x) -> dict[str, float]:
    """`{site: H}` (bits) of one batch `x` (NHWC) in train mode: batch statistics,
    dropout on. `m` is left unchanged (running statistics, mode, masks)."""
    graphdef = recording_graphdef(m, train=True, record=True)
    values = np.asarray(_forward_entropy(graphdef, nnx.state(m), jnp.asarray(x)))
    return dict(zip(m.sites(), values.tolist()))
