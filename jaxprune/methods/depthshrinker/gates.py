"""DepthShrinker's gate math and keep rule (DESIGN.md §6).

Each gate has a raw score `s` (initialised at 0) that measures how much its
activations may be identities:

    c = clamp(s, 0, 1)                       # torch.clamp: gradient 1 inside AND on the bounds
    keep = 1 for the k = floor(N * ratio) smallest scores, else 0
    site mask = keep - (c - stop_gradient(c))  # value: keep; gradient: -dc/ds

so `y = x + mask * (relu6(x) - x) = relu6(x) + (x - relu6(x)) * m` with
`m = (1 - keep) + c - stop_gradient(c)`, the released code's hard gate. The
cost regularizer is `λ Σ Δ_k (1 - s_k)` ("reduce": pushes the scores of the
gates that save most up, towards removal) or the released `λ Σ Δ_k s_k`
("keep", which does the opposite).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UserError
from jaxprune.methods.depthshrinker import COST_SIGNS

# The released search logs keep-lists for these kept fractions.
RATIOS = (0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


def clamp01(s):
    """torch.clamp(s, 0, 1) with torch's gradient: 1 where 0 <= s <= 1 (bounds included),
    0 outside. (`jnp.clip` gives 0.5 on a bound, which would halve the first step from
    the initial s = 0.)"""
    inside = (s >= 0) & (s <= 1)
    return jnp.where(inside, s, jax.lax.stop_gradient(jnp.clip(s, 0.0, 1.0)))


def keep_count(n: int, ratio: float) -> int:
    """k = floor(N * ratio), the released code's int(N * ratio)."""
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"the kept fraction of gates must be in [0, 1], got {ratio}")
    return int(math.floor(n * ratio))


def keep_smallest(scores, k: int):
    """1.0 for the k smallest scores, 0.0 for the rest; ties go to the earlier gate
    (stable order). Works traced and on NumPy arrays."""
    order = jnp.argsort(scores, stable=True)
    ranks = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.shape[0]))
    return (ranks < k).astype(jnp.float32)


def gate_masks(scores, keep):
    """Per-gate site masks (1 = nonlinear): value `keep`, gradient `-dc/ds`."""
    c = clamp01(scores)
    return keep - (c - jax.lax.stop_gradient(c))


def gumbel(key, shape):
    """Standard Gumbel noise (exploration: the search ranks `s + scale * G`)."""
    return jax.random.gumbel(key, shape, jnp.float32)


def cost_penalty(scores, delta, sign: str):
    """Σ Δ_k (1 - s_k) for "reduce" (latency-reducing), Σ Δ_k s_k for "keep" (as released)."""
    if sign == "reduce":
        return jnp.sum(delta * (1.0 - scores))
    if sign == "keep":
        return jnp.sum(delta * scores)
    raise UserError(f"cost sign must be one of {list(COST_SIGNS)}, got {sign!r}")


def keep_lists(scores: Sequence[float], ratios: Sequence[float] = RATIOS) -> dict[str, list[int]]:
    """{ratio: keep-list} from final scores: 1 for the floor(N * ratio) smallest."""
    s = np.asarray(scores, np.float32)
    return {f"{r:g}": [int(v) for v in np.asarray(keep_smallest(s, keep_count(len(s), r)))]
            for r in ratios}


def parse_keep_list(values: Sequence, n: int, what: str) -> np.ndarray:
    """A keep-list (1 keep, 0 remove) as float32, or a UserError naming `what`."""
    arr = np.asarray(values, np.float64)
    if arr.shape != (n,) or not np.isin(arr, (0, 1)).all():
        raise UserError(f"{what} must be {n} values, each 0 (remove) or 1 (keep); got {list(values)}")
    return arr.astype(np.float32)
