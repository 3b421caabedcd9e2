"""The search of ECDC and LayerMerge as pure functions over tables (no model, no JAX).

Positions 0..L are the outputs of the searchable convolutions (0 = the input of the first
one); a *segment* (i, j) replaces convs i+1..j by one merged conv, in one of its *options*
(LayerMerge: which convs it keeps, keyed like "k3s1d"; ECDC: the single option `MERGED`).
A plan is a chain of segments 0 = b0 < b1 < ... < bn = L, one option each, and an
activation flag a at every boundary: a = 1 (nonlinear) everywhere except at the `act_free`
positions (ECDC's block ends), where the search picks a in {0, 1}.

* `t_opt` — ECDC stage 1 (Kim et al., ICML 2023, Algorithm 1): the fastest unmerged split
  of every segment into measured sub-segments.
* `extend_importance` — ECDC's extended importance (Algorithm 3, App. B).
* `solve` — the exact dynamic program of both papers in one: state (t, m, a), maximise the
  summed importance subject to the summed discretised latency <= the budget (ECDC stage 2,
  Algorithm 1, with T = T_opt; LayerMerge, Kim et al., ICML 2024, with the kernel options
  and the raw T). Given several latency tables (one per runtime), each with its budget,
  t is a vector of bins, one per table, and the plan fits every budget at once.
* `brute_force` — every plan enumerated, same objective and tie-break (a check, L <= 10).
* `Plan` — what the search chose, as JSON (`PLAN_SCHEMA`).

Latency tables are in ms (any consistent unit works, the messages say ms); importance is
unitless and may be negative.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from jaxprune.errors import UserError, counted

MERGED = "merged"                      # the one option of a segment in an ECDC space
PLAN_SCHEMA = "jaxprune.layermerge.plan/2"  # 2: a plan's edits name the convs it drops
READ_SCHEMAS = ("jaxprune.layermerge.plan/1", PLAN_SCHEMA)
ROUNDINGS = ("ceil", "floor")
BRUTE_FORCE_MAX_POSITIONS = 10
DEFAULT_BINS = 1000
# With several tables the grid is the product of their bins (memory O(L * bins^K)): 400 per
# table keeps two tables at 160k cells a state, each entry rounded up by < 1/400 of its budget.
DEFAULT_BINS_SEVERAL = 400
# The DP keeps, per state, its values, their bins used and its choices on the grid (20 bytes
# a cell); a grid needing more than this is refused before it is allocated.
MAX_GRID_BYTES = 8 * 2**30
DECIMALS = 7  # importance sums are compared rounded to this many decimals, as the reference


class SearchError(UserError, ValueError):
    """A bad search input, a budget no plan fits, or a bad plan file. A `UserError`
    (`run.py` prints it as one line) and a `ValueError` for callers of these pure functions."""


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _ms(value, what: str) -> float:
    """A latency: a finite number >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SearchError(f"{what} is {value!r}, not a number of ms") from None
    if not math.isfinite(v) or v < 0:
        raise SearchError(f"{what} is {v!r}: a latency must be a finite number of ms >= 0")
    return v


def _segment(seg, what: str, positions: int | None = None) -> tuple[int, int]:
    """(i, j) with 0 <= i < j (<= positions)."""
    if not (isinstance(seg, tuple) and len(seg) == 2 and all(map(_is_int, seg))):
        raise SearchError(f"{what} {seg!r} is not a segment (i, j) of two integers")
    i, j = int(seg[0]), int(seg[1])
    top = "L" if positions is None else positions
    if not (0 <= i < j and (positions is None or j <= positions)):
        raise SearchError(f"{what} {seg!r} is outside 0..{top}: a segment (i, j) needs "
                          f"0 <= i < j <= {top}")
    return i, j


@dataclasses.dataclass(frozen=True)
class Space:
    """Where the search may cut: positions 0..`positions` (L), the valid segments with
    their options, and the activation rules.

    `options`: {(i, j): (option, ...)} in the order candidates are tried on a tie (the
    reference's table row order); `act_free`: positions in 1..L whose activation the search
    chooses (ECDC's block ends; elsewhere a = 1); `forced`: positions every plan must cut at
    (no segment may cross one). Segments are kept sorted by (i, j).

    Raises `SearchError` for a segment outside 0..L, an empty or repeated option, a segment
    on no chain of segments from 0 to L, an `act_free` position that ends no segment (or is
    0, the input), and a segment crossing a forced boundary.
    """
    positions: int
    options: Mapping[tuple[int, int], tuple[str, ...]]
    act_free: frozenset[int] = frozenset()
    forced: frozenset[int] = frozenset()

    @classmethod
    def merged(cls, positions: int, segments: Iterable[tuple[int, int]], *,
               act_free: Iterable[int] = (), forced: Iterable[int] = ()) -> Space:
        """An ECDC space: every segment has the single option `MERGED`."""
        return cls(positions, {tuple(s): (MERGED,) for s in segments},
                   frozenset(act_free), frozenset(forced))

    def __post_init__(self):
        L = self.positions
        if not _is_int(L) or L < 1:
            raise SearchError(f"positions is {L!r}: a space needs an integer L >= 1 "
                              "(positions 0..L)")
        options = {}
        for seg, names in dict(self.options).items():
            seg = _segment(seg, "segment", L)
            names = (names,) if isinstance(names, str) else tuple(names)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise SearchError(f"segment {seg} has options {names!r}: give one or more "
                                  "non-empty option names")
            if len(set(names)) != len(names):
                raise SearchError(f"segment {seg} lists an option twice: {names!r}")
            options[seg] = names
        object.__setattr__(self, "options", MappingProxyType(dict(sorted(options.items()))))
        object.__setattr__(self, "act_free", frozenset(self._positions(self.act_free, "act_free")))
        object.__setattr__(self, "forced", frozenset(self._positions(self.forced, "forced")))
        self._check_chains()
        ends = {j for _, j in options}
        for p in sorted(self.act_free):
            if p == 0:
                raise SearchError("act_free holds position 0, the input of the first searched "
                                  "conv, whose activation is not searched: drop it")
            if p not in ends:
                raise SearchError(f"act_free position {p} ends no segment: drop it or add a "
                                  f"segment ending at {p}")
        for i, j in self.options:
            crossed = [f for f in sorted(self.forced) if i < f < j]
            if crossed:
                raise SearchError(f"segment {(i, j)} crosses the forced boundary {crossed[0]}: "
                                  "drop the segment or the boundary")

    def _positions(self, values, what: str) -> list[int]:
        out = []
        for p in values:
            if not _is_int(p) or not 0 <= p <= self.positions:
                raise SearchError(f"{what} holds {p!r}, not a position in 0..{self.positions}")
            out.append(int(p))
        return out

    def _check_chains(self) -> None:
        """Every segment lies on a chain of segments from 0 to L."""
        L, segs = self.positions, list(self.options)
        reached = {0}
        for i, j in segs:                   # sorted by i: all ways into i come first
            if i in reached:
                reached.add(j)
        if L not in reached:
            raise SearchError(f"no chain of segments leads from position 0 to {L} (the "
                              f"furthest reached is {max(reached)}): add the missing segments")
        reaches_end = {L}
        for i, j in reversed(segs):         # all ways out of j come first
            if j in reaches_end:
                reaches_end.add(i)
        for i, j in segs:
            if i not in reached:
                raise SearchError(f"segment {(i, j)} starts at position {i}, which no chain of "
                                  f"segments from 0 reaches: add a segment ending at {i} or "
                                  "drop this one")
            if j not in reaches_end:
                raise SearchError(f"segment {(i, j)} ends at position {j}, from which no chain "
                                  f"of segments reaches {L}: add a segment starting at {j} or "
                                  "drop this one")

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        """The valid segments (i, j), sorted by (i, j)."""
        return tuple(self.options)

    def acts(self, p: int) -> tuple[int, ...]:
        """The activation flags a position may take: (0, 1) if free, else (1,)."""
        return (0, 1) if p in self.act_free else (1,)

    def _option_key(self, key, what: str) -> tuple[int, int, str]:
        """(i, j, option) from (i, j, option), or (i, j) for a single-option segment."""
        if not isinstance(key, tuple) or len(key) not in (2, 3):
            raise SearchError(f"{what} key {key!r} is not (i, j, option) or (i, j)")
        seg = _segment(key[:2], f"{what} key", self.positions)
        if seg not in self.options:
            raise SearchError(f"unknown segment {seg} in {what}: not one of the space's "
                              "segments (Space.options)")
        opts = self.options[seg]
        if len(key) == 2:
            if len(opts) != 1:
                raise SearchError(f"segment {seg} has options {opts}: key {what} by "
                                  "(i, j, option)")
            return (*seg, opts[0])
        if key[2] not in opts:
            raise SearchError(f"unknown option {key[2]!r} of segment {seg} in {what}: "
                              f"the space gives {opts}")
        return (*seg, key[2])

    def _act_key(self, key, what: str) -> tuple[int, int, str, int, int]:
        """(i, j, option, a_i, a_j) from that, or from (i, j, a_i, a_j) for a single-option
        segment, or from (i, j, option) / (i, j) for both ends active."""
        if not isinstance(key, tuple) or len(key) not in (2, 3, 4, 5):
            raise SearchError(f"{what} key {key!r} is not (i, j, option, a_start, a_end)")
        acts = key[-2:] if len(key) in (4, 5) else (1, 1)
        seg = self._option_key(key[:3] if len(key) in (3, 5) else key[:2], what)
        for p, a in zip(seg[:2], acts):
            if a not in (0, 1):
                raise SearchError(f"{what} key {key!r}: activation flag {a!r} is not 0 or 1")
            if a == 0 and p not in self.act_free:
                raise SearchError(f"{what} key {key!r} has no activation at position {p}, "
                                  "which is not free (Space.act_free): drop the key or free "
                                  "the position")
        return (*seg, int(acts[0]), int(acts[1]))


def _latency_table(space: Space, latency: Mapping) -> dict[tuple[int, int, str], float]:
    """{(i, j, option): ms} for every segment option of `space`."""
    out = {}
    for key, value in latency.items():
        k = space._option_key(key, "latency")
        if k in out:
            raise SearchError(f"latency gives {k} twice (as {key!r} and another key)")
        out[k] = _ms(value, f"latency {key!r}")
    missing = [(i, j, o) for (i, j), opts in space.options.items() for o in opts
               if (i, j, o) not in out]
    if missing:
        raise SearchError(f"latency has no entry for {missing[0]} (and {len(missing) - 1} "
                          "more): time every option of every segment of the space")
    return out


def _importance_table(space: Space, importance: Mapping) -> dict[tuple, float]:
    """{(i, j, option, a_i, a_j): importance}. A key not given is a transition the
    search never takes (as the reference's unmeasured keys)."""
    out = {}
    for key, value in importance.items():
        k = space._act_key(key, "importance")
        if k in out:
            raise SearchError(f"importance gives {k} twice (as {key!r} and another key)")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise SearchError(f"importance {key!r} is {value!r}, not a number") from None
        if not math.isfinite(v):
            raise SearchError(f"importance {key!r} is {v!r}: give a finite number")
        out[k] = v
    return out


@dataclasses.dataclass(frozen=True)
class _Grid:
    """The time discretisation: `size` bins (P) of `bin_ms`, and `bins(ms)` per entry."""
    budget_ms: float
    size: int
    bin_ms: float
    rounding: str
    per_ms: Fraction          # bins per ms, exact
    reference: bool           # prec + floor: the reference's float truncation

    def bins(self, ms: float) -> int:
        if self.reference:
            return int(ms * float(self.per_ms))
        exact = Fraction(ms) * self.per_ms
        return math.ceil(exact) if self.rounding == "ceil" else math.floor(exact)


def _grid(budget_ms, bins, prec, rounding, default_bins=DEFAULT_BINS) -> _Grid:
    """`bins` over the budget (default `default_bins`), or `prec` bins per ms
    (P = floor(budget * prec)); "ceil" rounds each entry up in exact arithmetic, so a plan
    that fits in bins fits in ms; "floor" rounds down (with `prec`, as the reference:
    int(T * prec) in floats)."""
    try:
        budget = float(budget_ms)
    except (TypeError, ValueError):
        raise SearchError(f"budget {budget_ms!r} is not a number of ms") from None
    if not math.isfinite(budget) or budget <= 0:
        raise SearchError(f"budget {budget_ms!r} ms: give a latency budget > 0 ms")
    if rounding not in ROUNDINGS:
        raise SearchError(f"rounding {rounding!r}: use one of {ROUNDINGS}")
    if bins is not None and prec is not None:
        raise SearchError("give bins (over the budget) or prec (bins per ms), not both")
    if prec is None:
        bins = default_bins if bins is None else bins
        if not _is_int(bins) or bins < 1:
            raise SearchError(f"bins is {bins!r}: give an integer >= 1")
        per_ms = Fraction(int(bins)) / Fraction(budget)
        return _Grid(budget, int(bins), budget / bins, rounding, per_ms, False)
    if not isinstance(prec, (int, float)) or not math.isfinite(prec) or prec <= 0:
        raise SearchError(f"prec is {prec!r}: give a number of bins per ms > 0")
    per_ms = Fraction(prec)
    reference = rounding == "floor"
    size = int(budget * prec) if reference else math.floor(Fraction(budget) * per_ms)
    return _Grid(budget, size, 1 / prec, rounding, per_ms, reference)


class _Step(NamedTuple):
    """One DP transition: segment (start, end) in `option` from flag act_start to act_end;
    `bins` and `ms` hold one entry per latency table."""
    start: int
    end: int
    option: str
    act_start: int
    act_end: int
    bins: tuple[int, ...]
    ms: tuple[float, ...]
    importance: float


def _steps(space: Space, lats: list[dict], imp: dict, grids: tuple[_Grid, ...]
           ) -> dict[tuple[int, int], list[_Step]]:
    """{(m, a_m): transitions into that state} in the reference's loop order: start i up,
    then the options in the space's order, then a_i = 0 before 1."""
    out: dict[tuple[int, int], list[_Step]] = {}
    for m in range(1, space.positions + 1):
        for am in space.acts(m):
            out[(m, am)] = [
                _Step(i, m, o, ai, am, tuple(g.bins(lat[(i, m, o)]) for g, lat in zip(grids, lats)),
                      tuple(lat[(i, m, o)] for lat in lats), imp[key])
                for (i, j), opts in space.options.items() if j == m
                for o in opts for ai in space.acts(i)
                if (key := (i, m, o, ai, am)) in imp]
    return out


def _fastest(space: Space, steps: dict, k: int) -> tuple[int, float] | None:
    """The fastest chain from 0 to L in table `k` (fewest bins, then fewest ms), or None
    when the importance leaves no chain."""
    fastest: dict[tuple[int, int], tuple[int, float]] = {(0, 1): (0, 0.0)}
    for (m, am), into in steps.items():            # m increasing
        costs = [(fastest[(s.start, s.act_start)][0] + s.bins[k],
                  fastest[(s.start, s.act_start)][1] + s.ms[k])
                 for s in into if (s.start, s.act_start) in fastest]
        if costs:
            fastest[(m, am)] = min(costs)
    ends = [fastest[(space.positions, a)] for a in space.acts(space.positions)
            if (space.positions, a) in fastest]
    if not ends:
        furthest = max(m for m, _ in fastest)
        raise SearchError(f"importance leaves no chain of segments from 0 to "
                          f"{space.positions} (the furthest reached is position {furthest}): "
                          "give importance for the segments, with their activation flags, "
                          "that continue from there")
    return min(ends)


def _check_feasible(space: Space, steps: dict, lats: list[dict],
                    grids: tuple[_Grid, ...], names: Sequence[str]) -> None:
    """Raise the one-line `SearchError` when no plan fits: the importance leaves no chain
    from 0 to L, or in some table the fastest chain (fewest bins, then fewest ms) exceeds
    that table's budget (the message names the table when there are several)."""
    L = space.positions
    for k, (lat, grid) in enumerate(zip(lats, grids)):
        fast_bins, fast_ms = _fastest(space, steps, k)
        if fast_bins <= grid.size:
            continue
        which = f"{names[k]}: " if len(grids) > 1 else ""
        singles = [max(lat[(p, p + 1, o)] for o in space.options[(p, p + 1)])
                   for p in range(L) if (p, p + 1) in space.options]
        unmerged = math.fsum(singles) if len(singles) == L else None
        speed = (f", {unmerged / fast_ms:.2f}x faster than the unmerged {unmerged:.4g} ms"
                 if unmerged and fast_ms > 0 else "")
        if fast_ms > grid.budget_ms:
            raise SearchError(f"{which}budget {grid.budget_ms:g} ms is below the fastest plan "
                              f"({fast_ms:.4g} ms{speed}): raise the latency budget above "
                              f"{fast_ms:.4g} ms")
        raise BinsTooCoarse(f"{which}budget {grid.budget_ms:g} ms holds the fastest plan "
                          f"({fast_ms:.4g} ms{speed}) only before rounding: {grid.rounding} "
                          f"rounding makes it {fast_bins} bins of {grid.bin_ms:.4g} ms, over "
                          f"the budget's {grid.size}: raise the budget a little or use finer "
                          "bins")


class NoJointPlan(SearchError):
    """Each table's budget holds some plan, but no one plan holds them all."""


class BinsTooCoarse(SearchError):
    """The fastest plan fits a budget in ms, but not once its entries are rounded up to
    the grid's bins."""


def _no_joint_plan(grids: tuple[_Grid, ...], names: Sequence[str]) -> NoJointPlan:
    budgets = "; ".join(f"{n}: {g.budget_ms:.4g} ms" for n, g in zip(names, grids))
    return NoJointPlan(f"no plan fits the budgets of all {len(grids)} latency tables at once "
                       f"({budgets}), though each alone holds a plan: raise a budget")


def _rounded(x):
    return np.round(x, DECIMALS)


@dataclasses.dataclass(frozen=True)
class PlanSegment:
    """Convs start+1..end merged into one, in `option`; `act_end`: the activation after
    it is kept (nonlinear)."""
    start: int
    end: int
    option: str
    act_end: bool
    time_ms: float
    time_bins: int
    importance: float


@dataclasses.dataclass(frozen=True)
class MoreBudget:
    """A further latency table a plan was solved under (`solve` with several tables): its
    budget (`budget_ms`, `budget_bins` bins of `bin_ms`), the plan's summed time in it
    (`time_ms`, `time_bins`) and each of the plan's segments' entry (`segment_ms`, in the
    plan's order)."""
    budget_ms: float
    budget_bins: int
    bin_ms: float
    time_ms: float
    time_bins: int
    segment_ms: tuple[float, ...]


_PLAN_KEYS = ("schema", "positions", "budget", "segments", "objective", "time_ms", "time_bins",
              "more_budgets")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A chain of segments from position 0 to `positions`, with its objective (the summed
    importance, in chain order), its summed latency `time_ms` (exact sum of the table's
    floats) and `time_bins`, and the discretisation it was solved under: `budget_ms`,
    `budget_bins` (P) bins of `bin_ms`, `rounding`, all of the first latency table;
    `more_budgets`: the same of each further table it was solved under (none for one
    table). `extra`: further top-level JSON fields (model, tables) kept through
    `to_json`/`from_json`."""
    positions: int
    segments: tuple[PlanSegment, ...]
    objective: float
    time_ms: float
    time_bins: int
    budget_ms: float
    budget_bins: int
    bin_ms: float
    rounding: str
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    more_budgets: tuple[MoreBudget, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "segments", tuple(self.segments))
        object.__setattr__(self, "more_budgets", tuple(self.more_budgets))
        for b in self.more_budgets:
            if len(b.segment_ms) != len(self.segments):
                raise SearchError(f"plan more_budgets gives {len(b.segment_ms)} segment times "
                                  f"for {len(self.segments)} segments: one per segment")
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))
        clash = sorted(set(self.extra) & set(_PLAN_KEYS))
        if clash:
            raise SearchError(f"plan extra field {clash[0]!r} is a plan field: rename it")
        if self.rounding not in ROUNDINGS:
            raise SearchError(f"plan rounding {self.rounding!r}: use one of {ROUNDINGS}")
        at = 0
        for s in self.segments:
            if s.start != at or s.end <= s.start:
                raise SearchError(f"plan segment ({s.start}, {s.end}) does not continue the "
                                  f"chain at position {at}: segments must run 0 = b0 < b1 "
                                  "< ... < L without gaps")
            at = s.end
        if at != self.positions or not self.segments:
            raise SearchError(f"plan segments end at position {at}, not at {self.positions}")

    @property
    def boundaries(self) -> tuple[int, ...]:
        """0 = b0 < b1 < ... < bn = L."""
        return (0, *(s.end for s in self.segments))

    def to_json(self) -> str:
        """The plan as JSON text (schema `PLAN_SCHEMA`)."""
        return json.dumps({
            "schema": PLAN_SCHEMA, "positions": self.positions,
            "budget": {"ms": self.budget_ms, "bins": self.budget_bins,
                       "bin_ms": self.bin_ms, "rounding": self.rounding},
            "segments": [dataclasses.asdict(s) for s in self.segments],
            "objective": self.objective, "time_ms": self.time_ms,
            "time_bins": self.time_bins,
            **({"more_budgets": [dataclasses.asdict(b) for b in self.more_budgets]}
               if self.more_budgets else {}),
            **self.extra}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """A plan from `to_json`'s text. Raises `SearchError` for text that is not JSON, a
        schema outside `READ_SCHEMAS` (this one and schema 1, whose plans drop no conv), a
        missing key or a value of the wrong type."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SearchError(f"plan is not JSON ({e}): give the text Plan.to_json wrote") from None
        if not isinstance(data, dict) or data.get("schema") not in READ_SCHEMAS:
            schema = data.get("schema") if isinstance(data, dict) else None
            raise SearchError(f"plan schema is {schema!r}, not one of {READ_SCHEMAS}: give a "
                              "plan written by Plan.to_json of this version")
        budget = _field(data, "budget", dict, "")
        segs = _field(data, "segments", list, "")
        more = []
        for n, b in enumerate(data.get("more_budgets", [])):
            where = f"more_budgets[{n}]."
            if not isinstance(b, dict):
                raise SearchError(f"plan {where[:-1]} is {b!r}, not an object")
            times = _field(b, "segment_ms", list, where)
            if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in times):
                raise SearchError(f"plan JSON {where}segment_ms is {times!r}, not a list of "
                                  "numbers")
            more.append(MoreBudget(
                float(_field(b, "budget_ms", float, where)), _field(b, "budget_bins", int, where),
                float(_field(b, "bin_ms", float, where)), float(_field(b, "time_ms", float, where)),
                _field(b, "time_bins", int, where), tuple(float(t) for t in times)))
        segments = []
        for n, s in enumerate(segs):
            where = f"segments[{n}]."
            if not isinstance(s, dict):
                raise SearchError(f"plan {where[:-1]} is {s!r}, not an object")
            segments.append(PlanSegment(
                **{f.name: _field(s, f.name, _FIELD_TYPES[f.type], where)
                   for f in dataclasses.fields(PlanSegment)}))
        return cls(
            positions=_field(data, "positions", int, ""), segments=tuple(segments),
            objective=float(_field(data, "objective", float, "")),
            time_ms=float(_field(data, "time_ms", float, "")),
            time_bins=_field(data, "time_bins", int, ""),
            budget_ms=float(_field(budget, "ms", float, "budget.")),
            budget_bins=_field(budget, "bins", int, "budget."),
            bin_ms=float(_field(budget, "bin_ms", float, "budget.")),
            rounding=_field(budget, "rounding", str, "budget."),
            extra={k: v for k, v in data.items() if k not in _PLAN_KEYS},
            more_budgets=tuple(more))


_FIELD_TYPES = {"int": int, "str": str, "bool": bool, "float": float}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               dict: "an object", list: "a list"}


def _field(d: dict, key: str, typ: type, where: str):
    """d[key], checked to be a `typ` (a float field takes an integer too)."""
    if key not in d:
        raise SearchError(f"plan JSON lacks {where}{key!r}: give a plan written by "
                          "Plan.to_json")
    v = d[key]
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) if typ is float else
          isinstance(v, int) and not isinstance(v, bool) if typ is int else isinstance(v, typ))
    if not ok:
        raise SearchError(f"plan JSON {where}{key} is {v!r}, not {_TYPE_NAMES[typ]}")
    return v


def _plan(space: Space, grids: tuple[_Grid, ...], chain: list[_Step]) -> Plan:
    objective = 0.0
    for s in chain:                    # the DP's own order of additions
        objective += s.importance
    grid = grids[0]
    return Plan(
        positions=space.positions,
        segments=tuple(PlanSegment(s.start, s.end, s.option, bool(s.act_end), s.ms[0],
                                   s.bins[0], s.importance) for s in chain),
        objective=objective, time_ms=math.fsum(s.ms[0] for s in chain),
        time_bins=sum(s.bins[0] for s in chain), budget_ms=grid.budget_ms,
        budget_bins=grid.size, bin_ms=grid.bin_ms, rounding=grid.rounding,
        more_budgets=tuple(
            MoreBudget(g.budget_ms, g.size, g.bin_ms, math.fsum(s.ms[k] for s in chain),
                       sum(s.bins[k] for s in chain), tuple(s.ms[k] for s in chain))
            for k, g in enumerate(grids) if k))


def _tables(latency, budget_ms) -> tuple[list[Mapping], list]:
    """The latency tables and their budgets, as lists of the same length."""
    lats = [latency] if isinstance(latency, Mapping) else list(latency)
    budgets = (list(budget_ms) if isinstance(budget_ms, (list, tuple, np.ndarray))
               else [budget_ms])
    if not lats or not all(isinstance(t, Mapping) for t in lats):
        raise SearchError("latency is not a table {(i, j, option): ms} or a list of them: "
                          "give one table per budget")
    if len(lats) != len(budgets):
        raise SearchError(f"{counted(len(lats), 'latency table')} and "
                          f"{counted(len(budgets), 'budget')}: give one budget per table")
    return lats, budgets


def _prepare(space, latency, importance, budget_ms, bins, prec, rounding, names=None):
    lats, budgets = _tables(latency, budget_ms)
    names = list(names) if names is not None else [
        f"latency table {k + 1}" for k in range(len(lats))]
    if len(names) != len(lats):
        raise SearchError(f"{len(names)} table names for {len(lats)} latency tables: name "
                          "each table once")
    default = DEFAULT_BINS if len(lats) == 1 else DEFAULT_BINS_SEVERAL
    grids = tuple(_grid(b, bins, prec, rounding, default) for b in budgets)
    lats = [_latency_table(space, lat) for lat in lats]
    steps = _steps(space, lats, _importance_table(space, importance), grids)
    _check_feasible(space, steps, lats, grids, names)
    return grids, steps, names


def solve(space: Space, latency: Mapping | Sequence[Mapping], importance: Mapping,
          budget_ms: float | Sequence[float], *, bins: int | None = None,
          prec: float | None = None, rounding: str = "ceil",
          names: Sequence[str] | None = None) -> Plan:
    """The plan of largest summed importance whose summed discretised latency fits
    `budget_ms` (exact DP over states (t, m, a): t bins used, position m, activation flag a;
    ECDC stage 2, Kim et al., ICML 2023, Algorithm 1; LayerMerge, Kim et al., ICML 2024).

    `latency`: {(i, j, option) or (i, j): ms} for every option of every segment (ECDC:
    T_opt from `t_opt`). `importance`: {(i, j, option, a_i, a_j): value}; (i, j, a_i, a_j)
    for a single-option segment, (i, j, option) or (i, j) for a_i = a_j = 1; a key not given
    is a transition never taken (ECDC: `extend_importance` of the measured keys).
    Time bins: `bins` (default 1000) over the budget, or `prec` bins per ms (the reference:
    P = int(budget * prec)). `rounding`: "ceil" (default) rounds each entry up, exactly, so
    `plan.time_ms <= budget_ms`; "floor" truncates as the reference, so the true sum may
    exceed the budget by up to (number of segments) bins.

    Several tables (one per runtime, say): `latency` a list of tables and `budget_ms` a list
    of budgets, one each; the plan fits every budget at once. t is then a vector of bins,
    one per table (`bins` each, default 400), and the DP stays exact on that grid: time
    O(entries * P^K), memory O(L * P^K). The plan's fields describe the first table,
    `plan.more_budgets` the others. `names`: what the messages call each table (default
    "latency table 1", ...).

    Ties (as the reference): importance sums compared rounded to 7 decimals, then fewer
    accumulated bins (summed over the tables), then the first in loop order (start i up,
    options in the space's order, a_i = 0 before 1); the final flag a_L by the same rule,
    a = 0 first (the reference takes numpy's argmax there, without the bins rule). The
    reference also leaves t = P out of the base row, which only excludes a plan of 0 bins;
    here it is allowed. Time O(entries * P), memory O(L * P) for one table, vectorised over
    t with numpy.

    Raises `SearchError` (a `ValueError`) for bad tables or budget, a grid over
    `MAX_GRID_BYTES`, and when no plan fits:
    one line naming the fastest plan's latency and its speed-up over the unmerged network
    (every (k, k+1) at its slowest option), or, with several tables each of whose budgets
    some plan fits, `NoJointPlan` (a `SearchError`): no plan fits them all.
    """
    grids, steps, names = _prepare(space, latency, importance, budget_ms, bins, prec, rounding,
                                   names)
    P = tuple(g.size for g in grids)
    shape = tuple(p + 1 for p in P)
    need = 20 * math.prod(shape) * (len(steps) + 1)
    if need > MAX_GRID_BYTES:
        raise SearchError(f"the DP's grid of {' x '.join(map(str, shape))} time bins over "
                          f"{len(steps) + 1} states needs about {need / 2**30:.1f} GiB, over "
                          f"{MAX_GRID_BYTES / 2**30:.0f} GiB: give fewer bins per table "
                          "(method.bins)")
    value = {(0, 1): np.zeros(shape)}          # best summed importance within t bins
    used = {(0, 1): np.zeros(shape, np.int64)}  # its accumulated bins (the tie-break)
    choice: dict[tuple[int, int], np.ndarray] = {}
    for state, into in steps.items():            # positions in increasing order
        best = np.full(shape, -np.inf)
        best_r = best.copy()
        best_used = np.zeros(shape, np.int64)
        best_step = np.full(shape, -1, np.int32)
        for c, s in enumerate(into):
            src = (s.start, s.act_start)
            if src not in value or any(g > p for g, p in zip(s.bins, P)):
                continue
            take = tuple(slice(0, p + 1 - g) for g, p in zip(s.bins, P))
            put = tuple(slice(g, None) for g in s.bins)   # views: written through below
            cand = value[src][take] + s.importance
            cand_used = used[src][take] + sum(s.bins)
            cand_r = _rounded(cand)
            old_r, old_used = best_r[put], best_used[put]
            better = np.isfinite(cand) & ((cand_r > old_r)
                                          | ((cand_r == old_r) & (cand_used < old_used)))
            np.copyto(best[put], cand, where=better)
            np.copyto(best_r[put], cand_r, where=better)
            np.copyto(best_used[put], cand_used, where=better)
            np.copyto(best_step[put], c, where=better)
        if np.isfinite(best).any():
            value[state], used[state], choice[state] = best, best_used, best_step
    L = space.positions
    a_end = None
    for a in space.acts(L):
        if (L, a) in value and np.isfinite(value[(L, a)][P]):
            r, u = _rounded(value[(L, a)][P]), used[(L, a)][P]
            if a_end is None or r > _rounded(value[(L, a_end)][P]) or (
                    r == _rounded(value[(L, a_end)][P]) and u < used[(L, a_end)][P]):
                a_end = a
    if a_end is None:
        raise _no_joint_plan(grids, names)
    chain, t, state = [], P, (L, a_end)
    while state[0] > 0:
        s = steps[state][choice[state][t]]
        chain.append(s)
        t, state = tuple(a - g for a, g in zip(t, s.bins)), (s.start, s.act_start)
    return _plan(space, grids, chain[::-1])


def brute_force(space: Space, latency: Mapping | Sequence[Mapping], importance: Mapping,
                budget_ms: float | Sequence[float], *, bins: int | None = None,
                prec: float | None = None, rounding: str = "ceil",
                names: Sequence[str] | None = None) -> Plan:
    """`solve` by enumerating every plan (for tests; L <= 10): the same inputs, objective,
    discretisation, tie-breaks and errors. The tie order of `solve`, stated on whole plans:
    larger rounded objective, then fewer bins (summed over the tables), then compare from
    the end: a_L = 0 first, then the last segment earlier in loop order, then the one before
    it, and so on."""
    if space.positions > BRUTE_FORCE_MAX_POSITIONS:
        raise SearchError(f"brute_force enumerates every plan: L = {space.positions} is over "
                          f"{BRUTE_FORCE_MAX_POSITIONS}; use solve")
    grids, steps, names = _prepare(space, latency, importance, budget_ms, bins, prec, rounding,
                                   names)
    leaving: dict[tuple[int, int], list[tuple[int, _Step]]] = {}
    for into in steps.values():
        for c, s in enumerate(into):
            leaving.setdefault((s.start, s.act_start), []).append((c, s))
    best_key, best_chain = None, None
    stack = [((0, 1), 0.0, (0,) * len(grids), ())]
    while stack:
        (m, a), objective, total, chain = stack.pop()
        if m == space.positions:
            order = (a, *(c for c, _ in reversed(chain)))
            key = (-_rounded(objective), sum(total), order)
            if best_key is None or key < best_key:
                best_key, best_chain = key, chain
            continue
        for c, s in leaving.get((m, a), ()):
            after = tuple(t + g for t, g in zip(total, s.bins))
            if all(t <= g.size for t, g in zip(after, grids)):
                stack.append(((s.end, s.act_end), objective + s.importance, after,
                              chain + ((c, s),)))
    if best_chain is None:
        raise _no_joint_plan(grids, names)
    return _plan(space, grids, [s for _, s in best_chain])


def t_opt(T: Mapping[tuple[int, int], float], segments: Iterable[tuple[int, int]]
          ) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], tuple[int, ...]]]:
    """ECDC stage 1 (Kim et al., ICML 2023, Algorithm 1): the fastest way to run each
    segment without merging across its inner boundaries,
    T_opt(i, j) = min(T(i, j), min_k T_opt(i, k) + T(k, j)) over i < k < j with (i, k) and
    (k, j) valid, in ms. Segments in (i, j) order, strict `<` (the smallest k wins a tie,
    and the whole segment wins a tie with a split).

    `T`: {(i, j): ms} for every segment in `segments`. Returns ({(i, j): T_opt ms},
    {(i, j): breaks}), breaks = (i, b1, ..., j), endpoints included: the merged pieces that
    run. Raises `SearchError` for a missing, unknown, negative or non-finite entry.
    """
    segs = sorted({_segment(tuple(s), "segment") for s in segments})
    valid = set(segs)
    times = {}
    for key, value in T.items():
        seg = _segment(key, "T key")
        if seg not in valid:
            raise SearchError(f"unknown segment {seg} in T: not one of the segments given")
        times[seg] = _ms(value, f"T{seg}")
    missing = [s for s in segs if s not in times]
    if missing:
        raise SearchError(f"T has no entry for segment {missing[0]} (and {len(missing) - 1} "
                          "more): time every segment")
    best, breaks = {}, {}
    for i, j in segs:
        best[(i, j)], breaks[(i, j)] = times[(i, j)], (i, j)
        for k in range(i + 1, j):
            if (i, k) in valid and (k, j) in valid and best[(i, k)] + times[(k, j)] < best[(i, j)]:
                best[(i, j)] = best[(i, k)] + times[(k, j)]
                breaks[(i, j)] = (*breaks[(i, k)], j)
    return best, breaks


def extend_importance(space: Space, importance: Mapping) -> dict[tuple, float]:
    """ECDC's extended importance (Kim et al., ICML 2023, Algorithm 3, App. B): a segment
    may also run as a chain of measured pieces through linear boundaries k (a_k = 0, so
    k in `space.act_free`) that are not merged:
    I_ext(i, j, a_i, a_j) = max(I(i, j, a_i, a_j), max_k I_ext(i, k, a_i, 0) + I(k, j, 0, a_j)),
    defined on the given keys only, in (i, j) order.

    `space`: one option per segment (an ECDC space, `Space.merged`); `importance` keyed as
    for `solve`. Returns {(i, j, option, a_i, a_j): value} for `solve`. Raises
    `SearchError` for a space with several options on a segment, or a bad key or value.
    """
    several = [seg for seg, opts in space.options.items() if len(opts) != 1]
    if several:
        raise SearchError(f"segment {several[0]} has options {space.options[several[0]]}: "
                          "extended importance is ECDC's, one option per segment")
    imp = _importance_table(space, importance)
    opt = {seg: opts[0] for seg, opts in space.options.items()}
    ext = {}
    for key in sorted(imp):
        i, j, o, ai, aj = key
        ext[key] = imp[key]
        for k in range(i + 1, j):
            left = ext.get((i, k, opt.get((i, k)), ai, 0))
            right = imp.get((k, j, opt.get((k, j)), 0, aj))
            if left is not None and right is not None:
                ext[key] = max(ext[key], left + right)
    return ext
