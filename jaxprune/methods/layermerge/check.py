"""The plan check (`method.plan_checks`, beyond the papers): the plan's model is timed
against the model the latency tables time, in each runtime, before any training is spent on
it; a plan that misses the target is searched again under a budget tightened by what it
missed by.

Why: a table prices a plan as the whole model less the sum of its segments' savings, each
measured on its own (`timing: in_model`: the model with only that segment merged). Savings
need not add up: in JAX (one XLA program, fused across layers) the 7 single drops of a
digits plan saved 0.905 ms one by one and 0.707 ms together, on a 2.36 ms model, so a plan
of many segments can be predicted to meet the target and measure short of it.

A check times two whole models in each runtime of the tables, each in its own fresh
process, burst against burst, as the final measurement does (`jaxprune.measure`, 3 rounds
of 3 bursts of 20 calls): the table's model (BatchNorms folded, no run fused:
`latency.model_net`) and the plan's (its edits applied and merged: `latency.plan_net`),
with the original's weights (a merged model's speed does not depend on its weights). What
the plan saves there, s (burst by burst, `Timings.paired_saving_ms`), is set against what
the goal needs, N = the model's time less the goal's (the model over `target_speedup`, or
`latency_ms`). A runtime with s < N scales the plan's predicted saving P by N / s: the next
search must predict a saving of P·N/s there (its budget on the searched convs, unmerged −
P·N/s, below what the plan took, so the plan no longer fits it).

`method.checked_plan` runs the checks: up to `plan_checks` plans, the first that meets the
goal in every runtime kept, else the closest (the largest worst-runtime s / N), with a
warning. Each check's times go to the run folder's `plan_checks.json`, which a rerun reads.
"""
from __future__ import annotations

import dataclasses

from jaxprune.methods.layermerge.latency import LatencyTable, TableKey, model_net, plan_net
from jaxprune.methods.layermerge.space import Edits, ModelSpace
from models.net import Net


@dataclasses.dataclass(frozen=True)
class Check:
    """One runtime's check of a plan (times in ms per call of the table's batch):
    `model_ms`, the model the table times, and `plan_ms`, the plan's, as this check
    measured them (median of the bursts; the check's processes, not the table's);
    `saved_ms`, what the plan saves, burst by burst; `needed_ms`, what the goal needs it
    to save (N); `predicted_saved_ms`, the table's P; `budget_ms`, the budget on the
    searched convs the plan was searched under; `predicted_speedup`, the table's."""
    runtime: str
    model_ms: float
    plan_ms: float
    saved_ms: float
    needed_ms: float
    predicted_saved_ms: float
    budget_ms: float
    predicted_speedup: float

    @property
    def met(self) -> bool:
        return self.saved_ms >= self.needed_ms

    @property
    def speedup(self) -> float:
        """The plan's measured speed-up over the table's model (from the paired saving)."""
        return self.model_ms / max(self.model_ms - self.saved_ms, 1e-9)

    @property
    def share(self) -> float:
        """s / N: 1 or more where the plan meets the goal (where the goal needs no saving,
        infinite if met, minus infinity if not)."""
        if self.needed_ms <= 0:
            return float("inf") if self.met else float("-inf")
        return self.saved_ms / self.needed_ms

    def tightened_budget(self, unmerged_ms: float) -> float | None:
        """The next search's budget on the searched convs (ms) in this runtime, unmerged −
        P·N/s; None where the plan saved nothing measurable (s <= 0: no scale to go by)."""
        if self.saved_ms <= 0:
            return None
        return unmerged_ms - self.predicted_saved_ms * self.needed_ms / self.saved_ms

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "met": self.met, "speedup": self.speedup}


def measure_plan(m: Net, ms: ModelSpace, edits: Edits, tables: list[tuple[TableKey,
                 LatencyTable]], unmerged: list[float], planned: list[float],
                 budgets: list[float], goal, rounds: int = 3,
                 times: dict | None = None) -> list[Check]:
    """Each runtime's `Check` of the plan whose `edits` are given, on `m` (not changed):
    `tables` the (key, table) the plan was searched in, `unmerged` and `planned` the sums
    of each table over every conv alone and over the plan's segments (ms), `budgets` the
    plan's, `goal(model_ms)` the whole-model time (ms) the goal allows a model that takes
    `model_ms`. `times`: {runtime: [model ms, plan ms, saved ms]} of an earlier timing
    of the same plan, used instead of timing. Timed by process 0 of a multi-process run,
    its times sent to the others. Raises `jaxprune.measure`'s `UserError` when a timing
    process fails (on process 0; as for the latency table, the others wait)."""
    from jaxprune import distributed
    from jaxprune.measure.models import model_latency
    from jaxprune.methods.fuse_export import LATENCY_BURSTS, LATENCY_REPEATS
    key = tables[0][0]
    if times is None and distributed.is_main():   # the others get its times: plans alike
        t = model_latency({"model": model_net(m, ms, key),
                           "plan": plan_net(m, edits, key.input_size)},
                          key.input_size, batch=key.batch,
                          runtimes=[k.runtime for k, _ in tables], rounds=rounds,
                          bursts=LATENCY_BURSTS, repeats=LATENCY_REPEATS)
        times = {k.runtime: [t[f"model {k.runtime}"].median_ms, t[f"plan {k.runtime}"].median_ms,
                             t.paired_saving_ms(f"model {k.runtime}", f"plan {k.runtime}")]
                 for k, _ in tables}
    times = distributed.broadcast_json(times)   # (given: the same on every process)
    checks = []
    for (k, table), u, p, b in zip(tables, unmerged, planned, budgets):
        model, plan, saved = times[k.runtime]
        checks.append(Check(k.runtime, model, plan, saved, model - goal(model), u - p, b,
                            table.model_ms / table.model_after(u, p)))
    return checks
