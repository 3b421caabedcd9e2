"""The exact DP of `jaxprune.methods.layermerge.dp` on measured latency tables, against an
independent exact solver.

The tables in `tests/data/layermerge/` were measured by this project and are kept here as
they were written, each with the command that made it (its `source`): they are real
search problems, of the size the papers solve (MobileNetV2-1.0 at 224 px: 171 segments,
391 options with layer dropping), too large to enumerate. Their optimum is known instead
from an integer linear program solved by HiGHS (`scipy.optimize.milp`, zero gap): a plan
is a path of DP transitions from position 0 to L, so one 0/1 variable per transition,
flow conservation at every (position, activation flag) state and the one knapsack row
(summed bins <= the budget's bins) give the same problem with none of the DP's
recursion. The DP must reach the ILP's optimum, in both spaces (LayerMerge's options on T,
ECDC's T_opt with its activation flags and extended importance), for the method's own
importance (the segment entropy the table's run used) and for random importance, at
budgets from a small speed-up to the fastest plan.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, milp

import models
from jaxprune.methods.layermerge import dp
from jaxprune.methods.layermerge.dp import extend_importance, solve
from jaxprune.methods.layermerge.importance import segment_importance
from jaxprune.methods.layermerge.latency import TableKey, table_ms
from jaxprune.methods.layermerge.method import fastest_ms, stage_one
from jaxprune.methods.layermerge.space import build_space

DATA = Path(__file__).parent / "data" / "layermerge"
TABLES = sorted(p.name for p in DATA.glob("*.json"))
SPEEDUPS = (1.2, 1.5)  # and 5 % above the fastest plan (ceil rounding of its segments)


def ilp_optimum(space: dp.Space, latency: dict, importance: dict, budget_ms: float,
                bins: int) -> float:
    """The largest summed importance of a plan within the budget, by HiGHS, on the
    transitions and bins the DP itself reads (`dp._prepare`)."""
    (grid,), steps, _ = dp._prepare(space, latency, importance, budget_ms, bins, None, "ceil")
    arcs = [s for into in steps.values() for s in into]
    states = sorted({(s.start, s.act_start) for s in arcs} | {(s.end, s.act_end) for s in arcs})
    row = {st: k for k, st in enumerate(states)}
    flow = np.zeros((len(states), len(arcs)))
    for a, s in enumerate(arcs):
        flow[row[(s.start, s.act_start)], a] -= 1
        flow[row[(s.end, s.act_end)], a] += 1
    L = space.positions
    sink = [row[st] for st in states if st[0] == L]
    inner = [r for st, r in row.items() if st[0] not in (0, L)]
    cons = [LinearConstraint(flow[inner], 0, 0),                    # in = out inside
            LinearConstraint(-flow[row[(0, 1)]][None], 1, 1),         # one path leaves 0
            LinearConstraint(flow[sink].sum(0)[None], 1, 1),          # and reaches L
            LinearConstraint(np.array([[s.bins[0] for s in arcs]]), 0, grid.size)]
    res = milp(-np.array([s.importance for s in arcs]), integrality=np.ones(len(arcs)),
               bounds=Bounds(0, 1), constraints=cons, options={"mip_rel_gap": 0})
    assert res.success, res.message
    return -res.fun


@pytest.fixture(scope="module", params=TABLES)
def measured(request):
    """(the table file's data, the ECDC and LayerMerge spaces of its model, T)."""
    data = json.loads((DATA / request.param).read_text())
    key = data["table"]["key"]
    m = models.create(key["arch"], num_classes=data["num_classes"], **key["options"])
    lm, ecdc = build_space(m, drop_layers=True), build_space(m)
    assert key["space_hash"] == lm.hash, "the table is of another version of the space"
    T = table_ms(data["table"], TableKey(**{**key, "input_size": tuple(key["input_size"])}),
                 request.param)
    return data, ecdc, lm, T


def _problems(data, ecdc, lm, T):
    """(name, space, latency the DP reads, importance, unmerged ms) of both spaces."""
    scores, rng = data["site_entropy"], np.random.default_rng(0)
    # ECDC's segment is LayerMerge's option that keeps every conv: the same merged layer
    T_ecdc = {(i, j): T[(i, j, o)] for (i, j, o), kept in lm.keep.items()
              if kept == lm.convs(i, j)}
    topt, _, unmerged_ecdc = stage_one(ecdc, T_ecdc)
    lat_lm, _, unmerged_lm = stage_one(lm, T)
    for name, ms, lat, unmerged, imp in (
            ("layermerge", lm, lat_lm, unmerged_lm,
             segment_importance(lm, scores, data["drop_penalty"])),
            ("ecdc", ecdc, topt, unmerged_ecdc, segment_importance(ecdc, scores))):
        random = {k: float(rng.normal()) for k in imp}
        for which, values in (("entropy", imp), ("random", random)):
            if name == "ecdc":
                values = extend_importance(ms.space, values)
            yield f"{name}/{which}", ms, lat, values, unmerged


def test_the_dp_reaches_the_ilp_optimum_on_measured_tables(measured):
    data, ecdc, lm, T = measured
    checked = 0
    for name, ms, lat, imp, unmerged in _problems(data, ecdc, lm, T):
        fastest = fastest_ms(ms, lat)
        for budget in [unmerged / s for s in SPEEDUPS if unmerged / s > fastest] + [fastest * 1.05]:
            plan = solve(ms.space, lat, imp, budget, bins=400)
            best = ilp_optimum(ms.space, lat, imp, budget, 400)
            assert plan.time_bins <= plan.budget_bins and plan.time_ms <= budget, name
            assert plan.objective == pytest.approx(best, abs=1e-6), (name, budget)
            checked += 1
    assert checked >= 8   # both spaces, both importances, two budgets or more each


def test_the_ilp_finds_what_the_dp_misses_when_a_transition_is_lost(measured):
    """The check can fail: a DP that never takes one transition of the optimum (its
    importance key removed for the DP only) falls below the ILP's optimum of the full
    problem (random importance: no other plan ties)."""
    data, ecdc, lm, T = measured
    name, ms, lat, imp, unmerged = list(_problems(data, ecdc, lm, T))[1]
    assert name == "layermerge/random"
    budget = unmerged / SPEEDUPS[0]
    plan = solve(ms.space, lat, imp, budget, bins=400)
    s = max(plan.segments, key=lambda s: s.importance)   # the optimum's best segment
    key = next(k for k in imp if k[:3] == (s.start, s.end, s.option) and k[-1] == s.act_end)
    crippled = solve(ms.space, lat, {k: v for k, v in imp.items() if k != key}, budget, bins=400)
    assert crippled.objective < ilp_optimum(ms.space, lat, imp, budget, 400) - 1e-9
