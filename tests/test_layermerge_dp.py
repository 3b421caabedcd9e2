"""The ECDC / LayerMerge search (`jaxprune.methods.layermerge.dp`): two hand-made tables
with known optima, the exact DP against enumeration of every plan on random tables,
ECDC's stage 1 and extended importance on hand-checked tables, the plan file, and the
refusals of bad inputs. Pure numpy: the whole file runs in a few seconds."""
import dataclasses
import itertools
import json
import math

import numpy as np
import pytest

from jaxprune.errors import UserError
from jaxprune.methods.layermerge import dp
from jaxprune.methods.layermerge.dp import (
    MERGED, PLAN_SCHEMA, Plan, SearchError, Space, brute_force,
    _rounded, extend_importance, solve, t_opt)

ALL_L3 = [(0, 1), (1, 2), (2, 3), (0, 2), (1, 3), (0, 3)]

# ECDC-type toy (every boundary active): convs 1-2 merged run in 3 ms, 1-3 merged in 9 ms,
# but 1-3 run as the merged (0, 2) and conv 3 take 5 ms, so T_opt(0, 3) = 5 with a break at 2.
ECDC_T = {(0, 1): 2, (1, 2): 2, (2, 3): 2, (0, 2): 3, (1, 3): 3.5, (0, 3): 9}
ECDC_I = {(0, 1): 0.8, (1, 2): 0.9, (2, 3): 0.8, (0, 2): 1.6, (1, 3): 1.5, (0, 3): 2.45}

# LayerMerge-type toy: each segment has kernel options {option: (ms, importance)}.
LM = {(0, 1): {"k3s1d": (2, 0.8)}, (1, 2): {"k3s1d": (2, 0.9)}, (2, 3): {"k3s1d": (2, 0.8)},
      (0, 2): {"k5s1d": (3, 1.6), "k3s1d": (1.8, 1.3)},
      (1, 3): {"k5s1d": (3.5, 1.5), "k3s1d": (2, 1.2)},
      (0, 3): {"k7s1d": (9, 2.45), "k5s1d": (3, 2.0), "k3s1d": (1.7, 1.5)}}
LM_SPACE = Space(3, {seg: tuple(opts) for seg, opts in LM.items()})
LM_T = {(*seg, o): v[0] for seg, opts in LM.items() for o, v in opts.items()}
LM_I = {(*seg, o): v[1] for seg, opts in LM.items() for o, v in opts.items()}


def _outcome(fn, *args, **kw):
    """The plan, or the one-line message of the refusal."""
    try:
        return fn(*args, **kw)
    except SearchError as e:
        return str(e)


# ---------------------------------------------------------------- known optima


@pytest.mark.parametrize("rounding", ["ceil", "floor"])
@pytest.mark.parametrize("budget, boundaries, objective", [
    (6.0, (0, 1, 2, 3), 2.5),   # nothing merged: 0.8 + 0.9 + 0.8
    (5.5, (0, 3), 2.45),        # one segment (0, 3) run as its T_opt split: 5 ms
    (5.0, (0, 3), 2.45),
])
def test_ecdc_toy_optimum(budget, boundaries, objective, rounding):
    space = Space.merged(3, ALL_L3)
    topt, breaks = t_opt(ECDC_T, space.segments)
    assert topt[(0, 3)] == 5 and breaks[(0, 3)] == (0, 2, 3)
    plan = solve(space, topt, ECDC_I, budget, prec=10, rounding=rounding)
    assert plan.boundaries == boundaries
    assert plan.objective == pytest.approx(objective, abs=1e-12)
    assert all(s.act_end and s.option == MERGED for s in plan.segments)
    assert plan.time_ms <= budget
    assert plan == brute_force(space, topt, ECDC_I, budget, prec=10, rounding=rounding)
    # ECDC's merge positions S: the T_opt breaks of the chosen segments, without 0
    merge_at = set().union(*(breaks[(s.start, s.end)] for s in plan.segments)) - {0}
    assert merge_at == ({1, 2, 3} if budget == 6.0 else {2, 3})


@pytest.mark.parametrize("rounding", ["ceil", "floor"])
def test_ecdc_toy_infeasible(rounding):
    space = Space.merged(3, ALL_L3)
    topt, _ = t_opt(ECDC_T, space.segments)
    msg = ("budget 4.9 ms is below the fastest plan (5 ms, 1.20x faster than the unmerged "
           "6 ms): raise the latency budget above 5 ms")
    for fn in (solve, brute_force):
        with pytest.raises(SearchError) as e:
            fn(space, topt, ECDC_I, 4.9, prec=10, rounding=rounding)
        assert str(e.value) == msg
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("rounding", ["ceil", "floor"])
@pytest.mark.parametrize("budget, chosen, objective", [
    (6.0, [(0, 1, "k3s1d"), (1, 2, "k3s1d"), (2, 3, "k3s1d")], 2.5),
    (5.9, [(0, 2, "k5s1d"), (2, 3, "k3s1d")], 2.4),
    (4.5, [(0, 2, "k3s1d"), (2, 3, "k3s1d")], 2.1),
    (2.9, [(0, 3, "k3s1d")], 1.5),
])
def test_layermerge_toy_optimum(budget, chosen, objective, rounding):
    plan = solve(LM_SPACE, LM_T, LM_I, budget, prec=10, rounding=rounding)
    assert [(s.start, s.end, s.option) for s in plan.segments] == chosen
    assert plan.objective == pytest.approx(objective, abs=1e-12)
    assert plan.time_ms == pytest.approx(math.fsum(LM_T[c] for c in chosen))
    assert plan == brute_force(LM_SPACE, LM_T, LM_I, budget, prec=10, rounding=rounding)


def test_layermerge_toy_infeasible_names_fastest_plan_and_speedup():
    with pytest.raises(SearchError, match=r"^budget 1\.6 ms is below the fastest plan "
                       r"\(1\.7 ms, 3\.53x faster than the unmerged 6 ms\): raise the "
                       r"latency budget above 1\.7 ms$"):
        solve(LM_SPACE, LM_T, LM_I, 1.6, prec=10)
    # 1.7 ms in floats is 1.69999...: it holds the 1.7 ms plan, but not once rounded up
    with pytest.raises(SearchError, match=r"holds the fastest plan \(1\.7 ms.*only before "
                       r"rounding: ceil rounding makes it 17 bins of 0\.1 ms, over the "
                       r"budget's 16"):
        solve(LM_SPACE, LM_T, LM_I, 1.7, prec=10)


def test_rounding_ceil_never_overshoots_floor_may():
    """Floor (the reference's truncation) counts three 2.05 ms pieces as 3 x 20 bins of
    0.1 ms and fits them in a 6 ms budget; ceil counts 3 x 21 and refuses."""
    space = Space.merged(3, [(0, 1), (1, 2), (2, 3)])
    T = {(0, 1): 2.05, (1, 2): 2.05, (2, 3): 2.05}
    plan = solve(space, T, {s: 1.0 for s in T}, 6.0, prec=10, rounding="floor")
    assert plan.time_bins == 60 and plan.time_ms > 6.0
    with pytest.raises(SearchError, match="below the fastest plan"):
        solve(space, T, {s: 1.0 for s in T}, 6.0, prec=10, rounding="ceil")


def test_default_bins_over_the_budget():
    """bins=1000 over a 6 ms budget: each 2 ms piece is 333.3 bins; ceil takes 334, so the
    unmerged plan (exactly 6 ms) no longer fits and the merged (0, 3) wins; floor keeps it."""
    space = Space.merged(3, ALL_L3)
    topt, _ = t_opt(ECDC_T, space.segments)
    up = solve(space, topt, ECDC_I, 6.0)
    assert (up.boundaries, up.time_bins, up.budget_bins, up.rounding) == ((0, 3), 834, 1000, "ceil")
    down = solve(space, topt, ECDC_I, 6.0, rounding="floor")
    assert (down.boundaries, down.time_bins) == ((0, 1, 2, 3), 999)


def test_ties_go_to_fewer_bins_then_to_the_first_candidate():
    """Importance sums equal to 7 decimals tie; a tie goes to the plan with fewer bins, then
    to the candidate tried first: smaller start i, the option listed first, a_i = 0 before
    1; the last activation a_L = 0 first."""
    space = Space.merged(2, [(0, 1), (1, 2), (0, 2)])
    pair = {(0, 1): 0.5, (1, 2): 0.5}
    # (0, 2) scores 1e-9 less than the pair (a tie at 7 decimals) in 1 bin instead of 2
    plan = solve(space, {(0, 1): 1, (1, 2): 1, (0, 2): 1}, {**pair, (0, 2): 1 - 1e-9}, 5, prec=1)
    assert plan.boundaries == (0, 2)
    # the pair in 2 bins, (0, 2) in 3: fewer bins beats the earlier candidate
    plan = solve(space, {(0, 1): 1, (1, 2): 1, (0, 2): 3}, {**pair, (0, 2): 1.0}, 5, prec=1)
    assert plan.boundaries == (0, 1, 2)
    # both in 2 bins: into position 2, the candidate from i = 0 is tried before i = 1
    plan = solve(space, {(0, 1): 1, (1, 2): 1, (0, 2): 2}, {**pair, (0, 2): 1.0}, 5, prec=1)
    assert plan.boundaries == (0, 2)
    for options in [("k3s1d", "k1s1d"), ("k1s1d", "k3s1d")]:
        one = Space(1, {(0, 1): options})
        plan = solve(one, {(0, 1, o): 1 for o in options}, {(0, 1, o): 1 for o in options}, 5)
        assert plan.segments[0].option == options[0]
    free = Space.merged(2, [(0, 1), (1, 2)], act_free={1, 2})
    importance = {(0, 1, 1, a): 0.5 for a in (0, 1)}
    importance |= {(1, 2, a, b): 0.5 for a in (0, 1) for b in (0, 1)}
    plan = solve(free, {(0, 1): 1, (1, 2): 1}, importance, 5)
    assert [s.act_end for s in plan.segments] == [False, False]
    importance[(1, 2, 1, 1)] = 0.75
    plan = solve(free, {(0, 1): 1, (1, 2): 1}, importance, 5)
    assert [s.act_end for s in plan.segments] == [True, True]


# ---------------------------------------------------------------- DP vs enumeration


def _random_problem(rng, L, *, ties):
    """A random valid space on 0..L (some segments missing, some options, free activations,
    maybe forced boundaries) with its latency and (partial) importance tables. With `ties`,
    small integers and quarters, so that many plans tie."""
    pairs = [(i, j) for i in range(L) for j in range(i + 1, L + 1)]
    chosen = {p for p in pairs if rng.random() < 0.4}
    cuts = sorted(rng.choice(np.arange(1, L), size=rng.integers(0, L), replace=False).tolist())
    chain = [0, *cuts, L]
    chosen |= set(zip(chain, chain[1:]))     # at least one chain from 0 to L
    reached, reaches_end = {0}, {L}
    for i, j in sorted(chosen):
        if i in reached:
            reached.add(j)
    for i, j in sorted(chosen, reverse=True):
        if j in reaches_end:
            reaches_end.add(i)
    segments = sorted((i, j) for i, j in chosen if i in reached and j in reaches_end)
    uncrossed = [p for p in range(1, L) if not any(i < p < j for i, j in segments)]
    forced = [p for p in uncrossed if rng.random() < 0.5]
    ends = sorted({j for _, j in segments})
    act_free = [p for p in ends if rng.random() < 0.4]
    names = ["k1s1d", "k3s1d", "k3s1dw", "k5s1d"]
    options = {s: tuple(rng.permutation(names)[:rng.integers(1, 4)].tolist()) for s in segments}
    space = Space(L, options, frozenset(act_free), frozenset(forced))
    latency, importance = {}, {}
    for (i, j), opts in space.options.items():
        for o in opts:
            latency[(i, j, o)] = (float(rng.integers(0, 4)) if ties
                                  else float(rng.uniform(0.05, 3.0)))
            for ai, aj in itertools.product(space.acts(i), space.acts(j)):
                if rng.random() < 0.9:
                    importance[(i, j, o, ai, aj)] = (rng.integers(-2, 6) / 4 if ties
                                                     else float(rng.normal()))
    return space, latency, importance


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_solve_equals_brute_force_on_random_tables(seed, ties):
    """The DP returns the very plan enumeration finds (objective, ties broken the same
    way), refuses the same budgets with the same message, keeps the forced boundaries and
    a = 1 outside act_free, and with ceil rounding never exceeds the budget in ms."""
    rng = np.random.default_rng(seed + 100 * ties)
    grids = ([dict(prec=1), dict(prec=2, rounding="floor"), dict(bins=7)] if ties else
             [dict(), dict(bins=40), dict(prec=10), dict(prec=10, rounding="floor")])
    solved = 0
    for L in range(3, 8):
        space, latency, importance = _random_problem(rng, L, ties=ties)
        for grid in grids:
            budget = float(rng.uniform(0.2, 1.0) * sum(latency.values()) / len(space.options)
                           * L / 2) + 0.05
            plan = _outcome(solve, space, latency, importance, budget, **grid)
            assert plan == _outcome(brute_force, space, latency, importance, budget, **grid)
            if isinstance(plan, str):
                assert plan.startswith(f"budget {budget:g} ms") or "no chain" in plan, plan
                continue
            solved += 1
            keys, acts = [], {0: 1}
            for s in plan.segments:
                keys.append((s.start, s.end, s.option, acts[s.start], int(s.act_end)))
                acts[s.end] = int(s.act_end)
            assert all(a == 1 for p, a in acts.items() if p not in space.act_free)
            assert space.forced <= set(plan.boundaries)
            objective = 0.0
            for k in keys:
                objective += importance[k]
            assert plan.objective == objective
            true_ms = math.fsum(latency[k[:3]] for k in keys)
            assert plan.time_ms == true_ms and plan.time_bins <= plan.budget_bins
            if grid.get("rounding", "ceil") == "ceil":
                assert true_ms <= budget
    assert solved >= 8      # most budgets are feasible: the comparison is not vacuous


@pytest.mark.parametrize("ties", [False, True])
def test_two_tables_solve_equals_brute_force(ties):
    """With two latency tables (a runtime each) and a budget each, the DP returns the plan
    enumeration finds, and that plan fits both budgets in ms; a pair of budgets each of
    which some plan meets but no plan meets both is refused by both, in the same words.
    Each budget is a little above its own table's fastest plan, so both outcomes come up."""
    solved = joint = 0
    for seed in range(3):
        rng = np.random.default_rng(seed + 100 * ties)
        for L in range(3, 8):
            space, first, importance = _random_problem(rng, L, ties=ties)
            # the second runtime disagrees: what is fast in one may be slow in the other
            second = {k: float(rng.integers(0, 4)) if ties else float(rng.uniform(0.05, 3.0))
                      for k in first}
            _, steps, _ = dp._prepare(space, [first, second], importance, [1e9, 1e9], None,
                                      None, "ceil")
            fastest = [dp._fastest(space, steps, k)[1] for k in (0, 1)]
            for bins in (None, 30):
                budgets = [f * float(rng.uniform(1.02, 1.6)) + 0.05 for f in fastest]
                plan = _outcome(solve, space, [first, second], importance, budgets, bins=bins)
                assert plan == _outcome(brute_force, space, [first, second], importance,
                                        budgets, bins=bins)
                if isinstance(plan, str):
                    assert plan.startswith("no plan fits the budgets of all 2 latency tables"), \
                        plan
                    joint += 1
                    continue
                solved += 1
                _check_two_table_plan(space, first, second, importance, budgets, bins, plan)
    assert solved >= 8 and joint >= 4


def _check_two_table_plan(space, first, second, importance, budgets, bins, plan):
    """`plan` fits both budgets in ms, records the second table's entries, and is no better
    than the first table's best plan alone, and as good when that one fits both."""
    keys = [(s.start, s.end, s.option) for s in plan.segments]
    assert plan.time_ms == math.fsum(first[k] for k in keys) <= budgets[0]
    more, = plan.more_budgets
    assert more.segment_ms == tuple(second[k] for k in keys)
    assert more.time_ms == math.fsum(more.segment_ms) <= budgets[1]
    assert more.budget_bins == plan.budget_bins == (bins or dp.DEFAULT_BINS_SEVERAL)
    # the first table's best plan alone bounds the joint one, and is it when it also fits
    # the second budget with room for rounding up its entries
    alone = solve(space, first, importance, budgets[0], bins=more.budget_bins)
    assert _rounded(plan.objective) <= _rounded(alone.objective)
    room = len(alone.segments) * budgets[1] / more.budget_bins
    if math.fsum(second[(s.start, s.end, s.option)] for s in alone.segments) \
            <= budgets[1] - room:
        assert _rounded(plan.objective) == _rounded(alone.objective)


def test_two_tables_that_no_one_plan_fits():
    """Plan (0, 3) is fast only in table 1 and (0, 1)(1, 2)(2, 3) only in table 2: each
    budget alone holds a plan, both together none. A budget no plan meets in one table
    names that table."""
    space = Space.merged(3, [(0, 1), (1, 2), (2, 3), (0, 3)])
    one = {(0, 1): 2, (1, 2): 2, (2, 3): 2, (0, 3): 1}
    two = {(0, 1): 0.5, (1, 2): 0.5, (2, 3): 0.5, (0, 3): 4}
    importance = {seg: 1.0 for seg in space.segments}
    for fn in (solve, brute_force):
        with pytest.raises(dp.NoJointPlan, match=r"^no plan fits the budgets of all 2 latency "
                           r"tables at once \(latency table 1: 2 ms; latency table 2: 2 ms\), "
                           r"though each alone holds a plan: raise a budget$"):
            fn(space, [one, two], importance, [2, 2])
        with pytest.raises(SearchError, match=r"^latency table 2: budget 1 ms is below the "
                           r"fastest plan \(1.5 ms, 1.00x faster than the unmerged 1.5 ms\)"):
            fn(space, [one, two], importance, [5, 1])
        with pytest.raises(SearchError, match=r"^the torch table: budget 1 ms is below"):
            fn(space, [one, two], importance, [5, 1], names=["the jax table", "the torch table"])
    plan = solve(space, [one, two], importance, [2, 5])
    assert plan.boundaries == (0, 3) and plan.more_budgets[0].time_ms == 4
    with pytest.raises(SearchError, match="2 latency tables and 1 budget: give one budget "
                       "per table"):
        solve(space, [one, two], importance, [2])


# ---------------------------------------------------------------- ECDC stage 1 and Alg. 3


def test_t_opt_hand_table():
    T = {(0, 1): 1, (1, 2): 1, (2, 3): 1, (3, 4): 0.75, (0, 2): 2.5, (1, 3): 1.5,
         (0, 3): 2.5, (2, 4): 1.25, (1, 4): 5, (0, 4): 10}
    topt, breaks = t_opt(T, T)
    # (0, 2): the split 1 + 1 beats 2.5
    assert (topt[(0, 2)], breaks[(0, 2)]) == (2, (0, 1, 2))
    # (0, 3): the split at 1 (1 + 1.5) ties the whole segment's 2.5: the whole one stays
    assert (topt[(0, 3)], breaks[(0, 3)]) == (2.5, (0, 3))
    # (1, 4): splits at 2 (1 + 1.25) and at 3 (1.5 + 0.75) tie: the smallest k wins
    assert (topt[(1, 4)], breaks[(1, 4)]) == (2.25, (1, 2, 4))
    # (0, 4): T_opt(0, k) + raw T(k, 4): k=2 gives 2 + 1.25, k=3 ties it, k=1 is 1 + 5;
    # the left part's breaks carry over
    assert (topt[(0, 4)], breaks[(0, 4)]) == (3.25, (0, 1, 2, 4))
    assert topt[(3, 4)] == 0.75 and breaks[(2, 4)] == (2, 4)
    # a split needs both pieces to be segments: without (1, 2) the 5 ms (0, 2) stays whole
    assert t_opt({(0, 1): 0.25, (0, 2): 5}, [(0, 1), (0, 2)]) == (
        {(0, 1): 0.25, (0, 2): 5}, {(0, 1): (0, 1), (0, 2): (0, 2)})


def test_extend_importance_chains_through_linear_boundaries():
    space = Space.merged(3, ALL_L3, act_free={1, 2})
    importance = {(0, 1, 1, 0): 0.5, (0, 1, 1, 1): 0.25, (1, 2, 0, 0): 0.75,
                  (0, 2, 1, 0): 0.5, (1, 3, 0, 1): 0.25, (2, 3, 0, 1): 0.25,
                  (0, 3, 1, 1): 1.0, (2, 3, 1, 1): 2.0}
    ext = extend_importance(space, importance)
    assert set(ext) == {(i, j, MERGED, a, b) for i, j, a, b in importance}   # given keys only
    # (0, 2) with a_2 = 0: (0, 1) then (1, 2) through the linear position 1
    assert ext[(0, 2, MERGED, 1, 0)] == 0.5 + 0.75
    # (0, 3): through 1 gives 0.5 + 0.25, through 2 the extended 1.25 + 0.25: the largest
    assert ext[(0, 3, MERGED, 1, 1)] == 1.5
    assert ext[(2, 3, MERGED, 1, 1)] == 2.0 and ext[(0, 1, MERGED, 1, 1)] == 0.25
    with pytest.raises(SearchError, match="one option per segment"):
        extend_importance(LM_SPACE, LM_I)


# ---------------------------------------------------------------- plan file


def _lm_plan() -> Plan:
    plan = solve(LM_SPACE, LM_T, LM_I, 5.9, prec=10)
    return dataclasses.replace(plan, extra={"model": "mobilenet_v2", "input_size": [224, 224]})


def test_plan_json_round_trip():
    plan = _lm_plan()
    text = plan.to_json()
    data = json.loads(text)
    assert data["schema"] == PLAN_SCHEMA and data["model"] == "mobilenet_v2"
    assert data["budget"] == {"ms": 5.9, "bins": 59, "bin_ms": 0.1, "rounding": "ceil"}
    assert data["segments"][0] == {"start": 0, "end": 2, "option": "k5s1d", "act_end": True,
                                   "time_ms": 3.0, "time_bins": 30, "importance": 1.6}
    assert Plan.from_json(text) == plan
    assert "more_budgets" not in data       # one table: the file as before
    two = solve(LM_SPACE, [LM_T, {k: 2 * t for k, t in LM_T.items()}], LM_I, [5.9, 11.8],
                prec=10)
    assert Plan.from_json(two.to_json()) == two and two.more_budgets[0].time_ms == 2 * two.time_ms


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema="jaxprune.layermerge.plan/0"),
     "plan schema is 'jaxprune.layermerge.plan/0', not one of .*'jaxprune.layermerge.plan/2'"),
    (lambda d: d.pop("schema"), "plan schema is None"),
    (lambda d: d.pop("time_ms"), "plan JSON lacks 'time_ms'"),
    (lambda d: d["budget"].pop("rounding"), "plan JSON lacks budget.'rounding'"),
    (lambda d: d["segments"][1].pop("option"), r"plan JSON lacks segments\[1\].'option'"),
    (lambda d: d["segments"][0].update(end="2"), r"segments\[0\].end is '2', not an integer"),
    (lambda d: d["segments"].pop(0), r"does not continue the chain at position 0"),
    (lambda d: d.update(budget=None), r"budget is None, not an object"),
])
def test_plan_json_refusals(edit, message):
    data = json.loads(_lm_plan().to_json())
    edit(data)
    with pytest.raises(SearchError, match=message):
        Plan.from_json(json.dumps(data))


def test_plan_refuses_text_that_is_not_json_and_extra_fields_that_clash():
    with pytest.raises(SearchError, match="plan is not JSON"):
        Plan.from_json("{'schema': 1}")
    with pytest.raises(SearchError, match="'objective' is a plan field"):
        dataclasses.replace(_lm_plan(), extra={"objective": 1})


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("latency, importance, budget, message", [
    ({**LM_T, (0, 1, "k3s1d"): float("nan")}, LM_I, 5, r"latency \(0, 1, 'k3s1d'\) is nan"),
    ({**LM_T, (0, 1, "k3s1d"): -1.0}, LM_I, 5, r"is -1\.0: a latency must be .* >= 0"),
    ({k: v for k, v in LM_T.items() if k != (1, 3, "k5s1d")}, LM_I, 5,
     r"latency has no entry for \(1, 3, 'k5s1d'\)"),
    ({**LM_T, (0, 4, "k3s1d"): 1.0}, LM_I, 5, r"outside 0\.\.3"),
    ({**LM_T, (0, 2): 1.0}, LM_I, 5, r"segment \(0, 2\) has options .*key latency by"),
    (LM_T, {**LM_I, (1, 2, "k5s1d"): 1.0}, 5, r"unknown option 'k5s1d' of segment \(1, 2\)"),
    (LM_T, {**LM_I, (0, 3, "k3s1d", 1, 0): 1.0}, 5,
     r"no activation at position 3, which is not free"),
    (LM_T, {**LM_I, (0, 1, "k3s1d"): float("nan")}, 5, r"importance .* is nan"),
    (LM_T, LM_I, 0, r"budget 0 ms: give a latency budget > 0 ms"),
    (LM_T, LM_I, -2.5, r"budget -2\.5 ms"),
    (LM_T, LM_I, float("nan"), r"budget nan ms"),
])
def test_bad_tables_and_budgets(latency, importance, budget, message):
    with pytest.raises(SearchError, match=message):
        solve(LM_SPACE, latency, importance, budget)


def test_unknown_segment_in_importance():
    space = Space.merged(3, [(0, 1), (1, 2), (2, 3), (0, 2)])
    with pytest.raises(SearchError, match=r"unknown segment \(1, 3\) in importance"):
        solve(space, {s: 1.0 for s in space.segments}, {**ECDC_I}, 5)


def test_bad_grid_options():
    for kw, message in [(dict(bins=10, prec=10), "not both"), (dict(bins=0), "bins is 0"),
                        (dict(prec=-1.0), "prec is -1.0"), (dict(rounding="round"), "rounding")]:
        with pytest.raises(SearchError, match=message):
            solve(LM_SPACE, LM_T, LM_I, 5, **kw)
    # three tables of 2000 bins: 8e9 cells a state, refused before anything is allocated
    with pytest.raises(SearchError, match=r"^the DP's grid of 2001 x 2001 x 2001 time bins "
                       r"over \d+ states needs about \d+\.\d GiB, over 8 GiB: give fewer bins "
                       r"per table \(method.bins\)$"):
        solve(LM_SPACE, [LM_T] * 3, LM_I, [5] * 3, bins=2000)


def test_importance_that_leaves_no_chain():
    importance = {k: v for k, v in LM_I.items() if k[1] != 3}
    with pytest.raises(SearchError, match=r"importance leaves no chain of segments from 0 to 3 "
                       r"\(the furthest reached is position 2\)"):
        solve(LM_SPACE, LM_T, importance, 5)


@pytest.mark.parametrize("kw, message", [
    (dict(positions=3, segments=[(0, 1), (1, 2), (2, 4)]), r"\(2, 4\) is outside 0\.\.3"),
    (dict(positions=3, segments=[(0, 1), (1, 2)]),
     r"no chain of segments leads from position 0 to 3 \(the furthest reached is 2\)"),
    (dict(positions=3, segments=[(0, 1), (1, 3), (2, 3)]),
     r"segment \(2, 3\) starts at position 2, which no chain of segments from 0 reaches"),
    (dict(positions=3, segments=[(0, 1), (1, 3), (1, 2)]),
     r"segment \(1, 2\) ends at position 2, from which no chain of segments reaches 3"),
    (dict(positions=3, segments=ALL_L3, forced={2}), r"\(0, 3\) crosses the forced boundary 2"),
    (dict(positions=3, segments=ALL_L3, act_free={0}), "act_free holds position 0"),
    (dict(positions=3, segments=[(0, 1), (1, 3)], act_free={2}), "act_free position 2 ends no"),
    (dict(positions=3, segments=ALL_L3, act_free={7}), "act_free holds 7, not a position"),
    (dict(positions=0, segments=[]), "positions is 0"),
])
def test_bad_spaces(kw, message):
    with pytest.raises(SearchError, match=message):
        Space.merged(**kw)


def test_bad_options():
    with pytest.raises(SearchError, match="lists an option twice"):
        Space(1, {(0, 1): ("k3s1d", "k3s1d")})
    with pytest.raises(SearchError, match="give one or more"):
        Space(1, {(0, 1): ()})


def test_brute_force_is_for_small_spaces():
    space = Space.merged(11, [(k, k + 1) for k in range(11)])
    with pytest.raises(SearchError, match="L = 11 is over 10; use solve"):
        brute_force(space, {s: 1.0 for s in space.segments}, {s: 1.0 for s in space.segments}, 20)
    assert solve(space, {s: 1.0 for s in space.segments},
                 {s: 1.0 for s in space.segments}, 20).boundaries == tuple(range(12))

