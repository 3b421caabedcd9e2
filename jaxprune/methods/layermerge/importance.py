"""Proxy importance of a layermerge plan: the entropy of the activations it keeps.

A site's score is its ON/OFF entropy in bits (EASIER's, `jaxprune.methods.easier.entropy`):

* `entropy`: measured in train mode on every batch of one epoch of training data (no
  update), the mean over the batches;
* `bn_entropy`: data-free, from the BatchNorm right before the site (TLC): channel c is ON
  with probability Φ(β_c/|γ_c|) under a unit-normal normalized input, and the site's score
  is the channel mean of the binary entropy. A site whose pre-activation is not a
  BatchNorm output (ResNet's `relu2`, after the residual add) takes its `entropy` instead;
  `site_scores` says which.

A segment (i, j) earns the score of the activation it keeps at its end, a_j · H(j)
(`segment_importance`); every position ends exactly one segment of a plan, so a plan's
objective is the entropy it keeps, and a zero-entropy site costs nothing to linearize.
An activation a plan may insert at a free block end (MobileNetV2) is not a site of the
model and scores 0: the search only inserts one where that costs nothing.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from jaxprune.methods.easier.entropy import layer_entropy, site_entropy
from jaxprune.methods.layermerge.space import ModelSpace
from models.layers.norm import BatchNorm
from models.net import Net


def data_entropy(m: Net, batches) -> dict[str, float]:
    """{site: mean over `batches` of its ON/OFF entropy (bits)}, each batch a dict with
    "image" (NHWC) in train mode; `m` is left unchanged."""
    total, n = None, 0
    for batch in batches:
        h = site_entropy(m, batch["image"])
        total = h if total is None else {s: total[s] + v for s, v in h.items()}
        n += 1
    if not n:
        raise ValueError("no batches to measure the entropy on")
    return {s: v / n for s, v in total.items()}


def bn_site_entropy(m: Net, site: str) -> float | None:
    """The data-free entropy (bits) of `site` from the BatchNorm feeding it (see the
    module doc); None when its input is not a BatchNorm's output."""
    (src, *more) = dict(m.graph)[site]
    bn = m.layers.get(src)
    if more or not isinstance(bn, BatchNorm):
        return None
    gamma, beta = jnp.asarray(bn.scale.value), jnp.asarray(bn.bias.value)
    # γ = 0: the channel is a constant β, ON iff β >= 0 (entropy 0)
    p_on = jnp.where(gamma == 0, (beta >= 0).astype(jnp.float32),
                     norm.cdf(beta / jnp.where(gamma == 0, 1.0, jnp.abs(gamma))))
    return float(layer_entropy(p_on))


def site_scores(m: Net, ms: ModelSpace, kind: str, batches) -> tuple[dict[str, float],
                                                                       dict[str, str]]:
    """({site: entropy in bits}, {site: "bn" or "data", where the score came from}) for
    the sites at the space's positions; `kind`: "entropy" or "bn_entropy". `batches` (a
    callable returning an epoch's batches) is only read when a site needs data."""
    sites = [p.site for p in ms.positions if p.site]
    scores, source = {}, {}
    if kind == "bn_entropy":
        for s in sites:
            h = bn_site_entropy(m, s)
            if h is not None:
                scores[s], source[s] = h, "bn"
    rest = [s for s in sites if s not in scores]
    if rest:
        measured = data_entropy(m, batches())
        for s in rest:
            scores[s], source[s] = measured[s], "data"
    return {s: scores[s] for s in sites}, {s: source[s] for s in sites}  # in forward order


def segment_importance(ms: ModelSpace, scores: dict[str, float]) -> dict[tuple, float]:
    """{(i, j, a_i, a_j): a_j · H(site at j)} for every segment and activation flag of
    `ms` (an inserted activation scores 0), as `dp.solve` takes it."""
    space = ms.space
    out = {}
    for i, j in space.segments:
        site = ms.positions[j].site
        h = scores[site] if site else 0.0
        for ai in space.acts(i):
            for aj in space.acts(j):
                out[(i, j, ai, aj)] = float(aj * h)
    return out


def kept_entropy(ms: ModelSpace, scores: dict[str, float], linear) -> float:
    """Summed entropy of the space's sites left nonlinear (positions 1..L), for checks."""
    linear = set(linear)
    return float(np.sum([scores[p.site] for p in ms.positions[1:]
                         if p.site and p.site not in linear]))
