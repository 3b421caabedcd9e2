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

With layer dropping (LayerMerge's space) an option also pays for the convs it drops, on
the entropy's scale (bits), so the objective is the entropy kept minus the convs' worth:

    I(i, j, option, a_i, a_j) = a_j · H(site at j) − λ · Σ_{c dropped by the option} d_c,
    d_c = H̄ · ‖W_c‖₁ / mean_{c' droppable, same class} ‖W_c'‖₁,

H̄ the mean entropy of the space's sites, ‖W‖₁ the L1 norm of a conv's raw kernel (the
measure LayerMerge's reference code ranks a segment's convs by, Kim et al., ICML 2024),
a class = (kernel size, depthwise), λ = `method.drop_penalty`. So dropping a conv of
average norm costs, at λ = 1, as much as linearizing a site of average entropy.
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


def drop_costs(ms: ModelSpace, scores: dict[str, float], penalty: float) -> dict[str, float]:
    """{droppable conv: d_c · λ}, the importance dropping it costs (see the module doc)."""
    mean_h = float(np.mean(list(scores.values()))) if scores else 0.0
    droppable = {c: f for c, f in ms.conv_facts.items() if f.droppable}
    norms: dict[tuple, list[float]] = {}
    for f in droppable.values():
        norms.setdefault(f.cls, []).append(f.l1)
    mean = {k: float(np.mean(v)) for k, v in norms.items()}
    return {c: penalty * mean_h * (f.l1 / mean[f.cls] if mean[f.cls] > 0 else 1.0)
            for c, f in droppable.items()}


def segment_importance(ms: ModelSpace, scores: dict[str, float], penalty: float = 1.0
                       ) -> dict[tuple, float]:
    """{(i, j, option, a_i, a_j): a_j · H(site at j) − Σ of its dropped convs' costs}
    for every segment option and activation flag `ms` allows (`ModelSpace.end_acts`; an
    inserted activation scores 0), as `dp.solve` takes it; `penalty`: λ of the module
    doc (layer dropping only)."""
    cost = drop_costs(ms, scores, penalty) if ms.drop_layers else {}
    out = {}
    for i, j, o in ms.entries():
        site = ms.positions[j].site
        h = scores[site] if site else 0.0
        paid = sum(cost[c] for c in ms.dropped(i, j, o))
        for key in ms.act_keys(i, j, o):
            out[key] = float(key[-1] * h - paid)
    return out


def kept_entropy(ms: ModelSpace, scores: dict[str, float], linear) -> float:
    """Summed entropy of the space's sites left nonlinear (positions 1..L), for checks."""
    linear = set(linear)
    return float(np.sum([scores[p.site] for p in ms.positions[1:]
                         if p.site and p.site not in linear]))
