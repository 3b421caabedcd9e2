"""layermerge's stages: space, latency table, importance, search (or a replayed plan),
finetune, exact merge (see the package doc)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from flax import nnx

from jaxprune import distributed
from jaxprune.context import MethodResult, RunContext
from jaxprune.errors import UserError, closest, counted
from jaxprune.files import write_json_atomic
from jaxprune.methods.distillation import Distillation, DistillHooks
from jaxprune.methods.fuse_export import fuse_and_export
from jaxprune.methods.layermerge import PLAN_CHECKS_FILE, PLAN_FILE, report, table_file
from jaxprune.methods.layermerge.check import measure_plan
from jaxprune.methods.layermerge.dp import (BinsTooCoarse, NoJointPlan, Plan, SearchError,
                                            extend_importance, solve, t_opt)
from jaxprune.methods.layermerge.finetune_importance import finetune_importance
from jaxprune.methods.layermerge.importance import (drop_costs, kept_entropy,
                                                    segment_importance, site_scores)
from jaxprune.methods.layermerge.latency import LatencyTable, latency_table, table_key
from jaxprune.methods.layermerge.space import Edits, ModelSpace, apply_edits, build_space
from jaxprune.methods.pretrain import original_model, train_stage
from jaxprune.train import evaluate_model
from models.net import Net


def fastest_ms(ms: ModelSpace, latency: dict) -> float:
    """The smallest summed latency of any chain of segments from 0 to L (ms); `latency`
    keyed (i, j), or (i, j, option) with layer dropping (the fastest option counts)."""
    seg = {}
    for key, t in latency.items():
        seg[key[:2]] = min(seg.get(key[:2], t), t)
    best = {0: 0.0}
    for i, j in ms.segments:                     # sorted by (i, j): i is final before j
        if i in best:
            best[j] = min(best.get(j, float("inf")), best[i] + seg[(i, j)])
    return best[ms.space.positions]


def stage_one(ms: ModelSpace, T: dict, breaks: dict | None = None
              ) -> tuple[dict, dict, float]:
    """(the latency the DP reads, {(i, j): the pieces a segment runs as}, the unmerged sum
    of T: every conv alone, ms) from the table `T`: ECDC's T_opt and its breaks, or with
    layer dropping T itself (LayerMerge: every segment one merged layer, no stage 1).
    Given `breaks` (the first runtime's, ECDC), each segment's latency is T summed over
    those same pieces instead: one model runs in every runtime, so a further runtime's
    table prices the pieces the first one chose."""
    unmerged = sum(t for e, t in T.items() if e[1] == e[0] + 1)
    if ms.drop_layers:
        return T, {}, unmerged
    if breaks is None:
        topt, breaks = t_opt(T, ms.segments)
        return topt, breaks, unmerged
    return ({seg: math.fsum(T[p] for p in zip(b, b[1:])) for seg, b in breaks.items()},
            breaks, unmerged)


def search(ms: ModelSpace, topts: list[dict], breaks: dict, importance: dict,
           budgets: list[float], bins: int | None, runtimes: tuple[str, ...]
           ) -> tuple[Plan, dict]:
    """The exact DP's plan under the `budgets` (ms, one per table of `topts`, timed in
    `runtimes`; ECDC's extended importance without layer dropping) and its segments'
    pieces, {(i, j): (i, ..., j)}, as `ModelSpace.edits` takes them."""
    plan = solve(ms.space, topts, importance if ms.drop_layers else
                 extend_importance(ms.space, importance), budgets, bins=bins,
                 names=[f"the {r} table" for r in runtimes])
    return plan, {(s.start, s.end): breaks[(s.start, s.end)] for s in plan.segments
                  if (s.start, s.end) in breaks}


def segment_ms(ms: ModelSpace, T: dict, s, pieces: dict) -> float:
    """A plan segment's time in the latency table `T` (ms): its entry (i, j, option) with
    layer dropping; in ECDC's space the sum over the pieces it runs as (`pieces`, the
    plan's {(i, j): (i, ..., j)}; a segment not in it runs whole). One model runs in every
    runtime, so each runtime's table prices the plan's own pieces, replayed or searched."""
    if ms.drop_layers:
        return T[(s.start, s.end, s.option)]
    b = pieces.get((s.start, s.end), (s.start, s.end))
    return math.fsum(T[p] for p in zip(b, b[1:]))


def planned_ms(ms: ModelSpace, plan: Plan, T: dict, pieces: dict) -> float:
    """The plan's segments summed in the latency table `T` (ms; `segment_ms`)."""
    return math.fsum(segment_ms(ms, T, s, pieces) for s in plan.segments)


def budget_ms(opts, ms: ModelSpace, topt: dict, unmerged: float, table: LatencyTable,
              where: str = "") -> float:
    """The DP's budget on the searched convs (ms): what lets the plan's predicted whole
    model (`LatencyTable.model_after`) take `latency_ms`, or the measured model's time over
    `target_speedup`. Raises the one-line `UserError` naming the best reachable speed-up
    when no plan is that fast (`where`: the runtime, named when there are several)."""
    fastest = table.model_after(unmerged, fastest_ms(ms, topt))
    if opts.latency_ms is not None:
        model, asked = opts.latency_ms, f"method.latency_ms {opts.latency_ms:g}"
    else:
        model, asked = table.model_ms / opts.target_speedup, \
            f"method.target_speedup {opts.target_speedup:g}"
    if model < fastest:
        raise UserError(f"{asked} is out of reach{where}: the fastest plan takes "
                        f"{fastest:.4g} ms of "
                        f"the whole model's {table.model_ms:.4g} ms (predicted from the "
                        f"latency table), a speed-up of {table.model_ms / fastest:.3g}x at "
                        "most; ask for at most that")
    return table.searched_budget(unmerged, model)


def best_common_speedup(ms: ModelSpace, stages: list, tables: list, importance: dict,
                        bins: int | None) -> float | None:
    """The largest whole-model speed-up that one plan reaches, as predicted, in every
    runtime's table at once: a bisection on the DP's feasibility, to 0.1 %, between 1x
    and the slowest runtime's own best. None when not even 1x holds in all of them (the
    bins' rounding, or an importance that leaves no plan). `stages`: each table's
    `stage_one`, `tables`: their (key, table)."""
    def fits(speedup: float) -> bool:
        budgets = [t.searched_budget(unmerged, t.model_ms / speedup)
                   for (_, t), (_, _, unmerged) in zip(tables, stages)]
        try:
            search(ms, [topt for topt, _, _ in stages], {}, importance, budgets, bins,
                   tuple(key.runtime for key, _ in tables))
        except SearchError:
            return False
        return True
    if not fits(1.0):
        return None
    lo = 1.0
    hi = min(t.model_ms / t.model_after(unmerged, fastest_ms(ms, topt))
             for (_, t), (topt, _, unmerged) in zip(tables, stages))
    while hi - lo > 1e-3 * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan_budgets(plan: Plan, runtimes: tuple[str, ...]) -> list[float | None]:
    """A replayed plan's budget (ms on the searched convs) in each of `runtimes`: the one
    it was solved under in that runtime's table, None for a runtime it was not solved in.
    (A plan of one table, written before several were searched at once, names it
    `latency_table`.)"""
    x = plan.extra
    keys = x.get("latency_tables") or [x.get("latency_table")]
    solved = [k.get("runtime") if isinstance(k, dict) else None for k in keys]
    budget = dict(zip(solved, [plan.budget_ms, *(b.budget_ms for b in plan.more_budgets)]))
    return [budget.get(r) for r in runtimes]


def _floored(speedup: float) -> str:
    """A reachable speed-up as a message names it: rounded down to 0.001, so that asking
    for the figure named stays within reach."""
    return f"{math.floor(speedup * 1000) / 1000:g}"


def _no_common_plan(target: float, runtimes: tuple[str, ...], best: float | None) -> str:
    """The one line for a `target` speed-up that each runtime's table reaches alone but no
    one plan reaches in all of them; `best`: `best_common_speedup`."""
    every = "both" if len(runtimes) == 2 else f"all {len(runtimes)}"
    reach = ("no one plan reaches even 1x in every table at once (the DP's bins round each "
             "entry up: raise method.bins)" if best is None else
             f"the best one plan reaches {_floored(best)}x in each "
             "(predicted from the latency tables): ask for at most that")
    return (f"method.target_speedup {target:g} is out of reach in {' and '.join(runtimes)} "
            f"at once: each table alone has a plan that fast, but no one plan is in "
            f"{every}; {reach}")


def read_plan(path: str, ms: ModelSpace, cfg, image_size, m: Net) -> tuple[Plan, dict, Edits]:
    """A plan file of an earlier run and its pieces, checked against this run: the model,
    its options, the input size and the space (with or without layer dropping); the site
    and layer names it edits must be the model's (an unknown one lists the closest), and
    must follow from its segments; the convs it drops must be droppable and match its
    options (a plan of schema 1, before layer dropping, drops none)."""
    plan = Plan.from_json(Path(path).read_text())
    x = plan.extra
    got = {"model": x.get("model"), "model_options": x.get("model_options"),
           "input_size": x.get("input_size")}
    want = {"model": cfg.model.name, "model_options": dict(cfg.model.options),
            "input_size": list(image_size)}
    differ = [f"{k} is {got[k]!r}, here {v!r}" for k, v in want.items() if got[k] != v]
    if differ:
        raise UserError(f"method.plan {path} was made for another model ({'; '.join(differ)}): "
                        "give a plan of this model, or drop method.plan to search one")
    edits = {"drop": [], **(x.get("edits") or {})}
    for flag in ("drop_layers", "strided_blocks"):   # a plan without one was made without
        if bool(x.get(flag, False)) != getattr(ms, flag):
            raise UserError(f"method.plan {path} was made with method.{flag} "
                            f"{str(bool(x.get(flag))).lower()}, here "
                            f"{str(getattr(ms, flag)).lower()}: set it as the plan's run did")
    for name in edits.get("linearize", []):
        if name not in m.sites():
            raise UserError(f"method.plan {path} linearizes {name!r}, not a site of "
                            f"{cfg.model.name}; {closest(name, m.sites())}")
    for name in [*edits.get("insert_act", {}).values(), *edits.get("cuts", [])]:
        if name not in m.layers:
            raise UserError(f"method.plan {path} names layer {name!r}, not a layer of "
                            f"{cfg.model.name}; {closest(name, list(m.layers))}")
    if x.get("space_hash") != ms.hash:
        raise UserError(f"method.plan {path} was made for another search space (space hash "
                        f"{str(x.get('space_hash'))[:12]}..., here {ms.hash[:12]}...): give a "
                        "plan of this version's space, or drop method.plan to search one")
    pieces = {tuple(map(int, k.split(","))): tuple(v) for k, v in x.get("pieces", {}).items()}
    made = ms.edits(plan, pieces, drop=edits["drop"])
    if made.as_dict() != edits:
        raise UserError(f"method.plan {path}: its edits do not follow from its segments (the "
                        "file was changed by hand?): give a plan a layermerge run wrote")
    return plan, pieces, made


def checked_plan(ctx: RunContext, m: Net, ms: ModelSpace, tables: list, stages: list,
                 importance: dict, budgets: list[float], plan: Plan, pieces: dict
                 ) -> tuple[Plan, dict, list[float], list[dict]]:
    """The plan checks (`check.py`): up to `method.plan_checks` plans timed, each after
    the first searched under the budgets its predecessor's shortfall tightened. Returns the
    first that meets the goal in every runtime, else the one whose worst runtime came
    closest (s / N), with its pieces and budgets, and every check as the results record it
    (the kept plan's marked `kept`). Stops early, saying why, when no tighter plan is
    left (out of reach in the tables) or a plan saved nothing measurable. Each check's
    times are kept in the run folder (`plan_checks.json`), and a rerun of the run reads
    them for the same plans instead of timing again, so it keeps the plan it finetuned."""
    opts = ctx.cfg.method
    runtimes = opts.runtimes
    goal = ((lambda model: model / opts.target_speedup) if opts.target_speedup is not None
            else (lambda model: opts.latency_ms))
    unmerged = [u for _, _, u in stages]
    cache = ctx.run_dir / PLAN_CHECKS_FILE   # a rerun keeps the plan it finetuned
    done = distributed.broadcast_json(json.loads(cache.read_text()) if distributed.is_main()
                                      and cache.is_file() else None) or []
    tried = []
    while True:
        edits = ms.edits(plan, pieces)
        n = len(tried) + 1
        earlier = done[n - 1]["times"] if n <= len(done) and \
            done[n - 1]["edits"] == edits.as_dict() else None
        ctx.log(f"layermerge: plan check {n} of {opts.plan_checks}: "
                + (f"the timing {cache.name} holds" if earlier else "timing the plan's model")
                + f" ({counted(len(edits.drop), 'conv')} dropped, "
                f"{counted(len(edits.linearize), 'site')} linearized) "
                f"against the table's in {' and '.join(runtimes)} ...")
        checks = measure_plan(m, ms, edits, tables, unmerged,
                              [planned_ms(ms, plan, t.T, pieces) for _, t in tables],
                              budgets, goal, times=earlier)
        if earlier is None:
            done = [*done[:n - 1], {"edits": edits.as_dict(), "times": {
                c.runtime: [c.model_ms, c.plan_ms, c.saved_ms] for c in checks}}]
            if distributed.is_main():
                write_json_atomic(cache, done)
        tried.append((plan, pieces, edits, budgets, checks))
        ctx.log(f"layermerge: plan check {n}: " + "; ".join(
            f"{c.runtime} predicted {c.predicted_speedup:.2f}x, measured {c.speedup:.2f}x "
            f"({'met' if c.met else 'short'})" for c in checks))
        if all(c.met for c in checks) or n == opts.plan_checks:
            break
        tighter = [b if c.met else c.tightened_budget(u)
                   for b, c, u in zip(budgets, checks, unmerged)]
        if None in tighter:
            ctx.log("layermerge: plan check: the plan saved nothing measurable in "
                    f"{checks[tighter.index(None)].runtime}, so no tighter budget follows")
            break
        try:
            plan, pieces = search(ms, [topt for topt, _, _ in stages], stages[0][1],
                                  importance, tighter, opts.bins, runtimes)
        except SearchError:
            ctx.log("layermerge: plan check: no plan meets the tightened budgets in the "
                    "tables; the check goes no further")
            break
        budgets = tighter
    kept = next((k for k, t in enumerate(tried) if all(c.met for c in t[-1])),
                max(range(len(tried)), key=lambda k: min(c.share for c in tried[k][-1])))
    if not all(c.met for c in tried[kept][-1]):
        ctx.log(f"layermerge: warning: no plan checked meets the goal in every runtime as "
                f"measured; keeping plan check {kept + 1}'s, the closest")
    record = [{"check": k + 1, "kept": k == kept, "segments": len(p.segments),
               "drop": list(e.drop), "runtimes": [c.as_dict() for c in cs]}
              for k, (p, _, e, _, cs) in enumerate(tried)]
    plan, pieces, _, budgets, _ = tried[kept]
    return plan, pieces, budgets, record


def finetune(ctx: RunContext, original: Net, planned: Net) -> dict:
    """Train the planned model `finetune_epochs` (optionally distilled from the original),
    checkpointed as stage `finetune`; returns its last epoch's accuracies."""
    opts = ctx.cfg.method
    epochs = ctx.cfg.train.epochs if opts.finetune_epochs is None else opts.finetune_epochs
    if not epochs:
        return {"epochs": 0}
    hooks = (DistillHooks(Distillation(original, temperature=opts.distill_temperature,
                                       kd_weight=opts.distill, ce_weight=1.0 - opts.distill))
             if opts.distill else None)
    return train_stage(ctx, planned, "finetune", epochs, hooks=hooks,
                       epoch_offset=opts.pretrain_epochs + 1,
                       summary=lambda trainer, last: {
                           "epochs": epochs, "distill": opts.distill or None,
                           "train_acc": last["train_acc"], "val_acc": last["val_acc"]})


def run(ctx: RunContext) -> MethodResult:
    cfg, opts = ctx.cfg, ctx.cfg.method
    original = original_model(ctx, opts.pretrain_epochs)
    ms = build_space(original, drop_layers=opts.drop_layers,
                     strided_blocks=opts.strided_blocks)
    L = ms.space.positions
    results = {"method": "layermerge", "model": cfg.model.name, "dataset": cfg.data.name,
               "image_size": list(ctx.image_size),
               "space": {"positions": L, "segments": len(ms.segments), "hash": ms.hash,
                         "breaks": list(ms.breaks), "free": sorted(ms.free_after),
                         "drop_layers": ms.drop_layers, "entries": len(ms.entries()),
                         "strided_blocks": ms.strided_blocks,
                         "droppable": [c for c, f in ms.conv_facts.items() if f.droppable]},
               "dense": evaluate_model(original, cfg.train, ctx.data, ctx.mesh)}

    if opts.plan is not None:   # refused before the table is timed
        plan, pieces, edits = read_plan(opts.plan, ms, cfg, ctx.image_size, original)
        ctx.log(f"layermerge: replaying {opts.plan}")
    runtimes, tables, stages = opts.runtimes, [], []
    for runtime, given in zip(runtimes, opts.latency_tables):
        key = table_key(ms, ctx.image_size, opts.latency_batch, runtime, opts.latency_timing)
        cache = ctx.run_dir / table_file(runtime, runtimes)
        if given is None and not cache.is_file():
            ctx.log(f"layermerge: timing {len(ms.entries())} segment options in {runtime} "
                    f"(jaxprune.measure) ...")
        tables.append((key, latency_table(original, ms, key, cache, given=given,
                                          rounds=opts.latency_rounds,
                                          repeats=opts.latency_repeats)))
        stages.append(stage_one(ms, tables[-1][1].T, stages[0][1] if stages else None))
    breaks = stages[0][1]

    scores = source = ft_table = checks = None
    if opts.plan is not None:
        budgets = plan_budgets(plan, runtimes)
    else:
        budgets = [budget_ms(opts, ms, topt, unmerged, table,
                             f" in {key.runtime}" if len(runtimes) > 1 else "")
                   for (key, table), (topt, _, unmerged) in zip(tables, stages)]
        if opts.importance == "finetune":
            importance, ft_table = finetune_importance(
                ctx, original, ms, results["dense"]["val_acc"], epochs=opts.importance_epochs,
                images=opts.importance_images, lr=opts.importance_lr,
                alpha=opts.importance_alpha)
        else:
            scores, source = site_scores(
                original, ms, opts.importance,
                lambda: ctx.data.train_batches(opts.pretrain_epochs)[1])
            importance = segment_importance(ms, scores, opts.drop_penalty)
        try:
            plan, pieces = search(ms, [topt for topt, _, _ in stages], breaks, importance,
                                  budgets, opts.bins, runtimes)
        except NoJointPlan:
            raise UserError(_no_common_plan(opts.target_speedup, runtimes, best_common_speedup(
                ms, stages, tables, importance, opts.bins))) from None
        except BinsTooCoarse as e:
            if opts.target_speedup is None:
                raise
            best = best_common_speedup(ms, stages, tables, importance, opts.bins)
            reach = ("no plan fits even 1x on this grid" if best is None else
                     f"the best plan on it reaches {_floored(best)}x: ask "
                     "for at most that")
            raise UserError(f"method.target_speedup {opts.target_speedup:g} is out of reach "
                            f"on the DP's grid, each entry rounded up to a bin ({e}); "
                            f"{reach}, or raise method.bins") from None
        if opts.plan_checks:
            plan, pieces, budgets, checks = checked_plan(ctx, original, ms, tables, stages,
                                                         importance, budgets, plan, pieces)
        edits = ms.edits(plan, pieces)
        plan = dataclasses.replace(plan, extra={
            "model": cfg.model.name, "model_options": dict(cfg.model.options),
            "input_size": list(ctx.image_size), "space_hash": ms.hash,
            "drop_layers": ms.drop_layers, "strided_blocks": ms.strided_blocks,
            "latency_tables": [key.as_dict() for key, _ in tables],
            "importance": opts.importance,
            "pieces": {f"{i},{j}": list(p) for (i, j), p in pieces.items()},
            "edits": edits.as_dict(),
            **({"plan_check_speedups": next({r["runtime"]: r["speedup"] for r in c["runtimes"]}
                                            for c in checks if c["kept"])} if checks else {})})
    if distributed.is_main():
        (ctx.run_dir / PLAN_FILE).write_text(plan.to_json() + "\n")
    latency = []
    for (key, table), (_, _, unmerged), budget in zip(tables, stages, budgets):
        planned = planned_ms(ms, plan, table.T, pieces)
        predicted = table.model_after(unmerged, planned)
        if table.clamped:
            ctx.log(f"layermerge: in the {key.runtime} table, {len(table.clamped)} segment "
                    "options save more inside the model than their searched convs cost "
                    "alone, and their T is taken as 0 (the prediction counts less than they "
                    "save): " + ", ".join(",".join(map(str, k)) for k in table.clamped))
        latency.append({"runtime": key.runtime, "timing": key.timing, "budget_ms": budget,
                        "clamped": [list(k) for k in table.clamped],
                        "unmerged_ms": unmerged,
                        "planned_ms": planned, "model_ms": table.model_ms,
                        "predicted_model_ms": predicted,
                        "predicted_speedup": table.model_ms / predicted,
                        "call_overhead_ms": table.overhead_ms})
    for r in latency:
        if report.overstated(r):
            ctx.log(f"layermerge: warning: the {r['runtime']} table's convs, timed one by one, "
                    f"sum to {r['unmerged_ms']:.4g} ms, more than the whole model's "
                    f"{r['model_ms']:.4g} ms: its predicted speed-up "
                    f"({r['predicted_speedup']:.2f}x) overstates the gain")
    results["search"] = {
        "replayed": opts.plan,
        "importance": opts.importance if opts.plan is None else "from the plan",
        "site_entropy": scores, "site_source": source, "finetune_table": ft_table,
        "entropy_kept": kept_entropy(ms, scores, edits.linearize) if scores else None,
        "entropy_total": kept_entropy(ms, scores, ()) if scores else None,
        "drop_cost": (sum(drop_costs(ms, scores, opts.drop_penalty)[c] for c in edits.drop)
                      if scores and ms.drop_layers else None),
        "latency": latency, "checks": checks, "bins": plan.budget_bins,
        "objective": plan.objective, "latency_batch": opts.latency_batch,
        "segments": [{**dataclasses.asdict(s), "convs": list(ms.convs(s.start, s.end)),
                      "T_ms": {key.runtime: segment_ms(ms, table.T, s, pieces)
                               for key, table in tables},
                      "dropped": [c for c in ms.convs(s.start, s.end) if c in edits.drop],
                      "pieces": list(pieces.get((s.start, s.end), (s.start, s.end)))}
                     for s in plan.segments],
        "edits": edits.as_dict(), "plan_file": str(ctx.run_dir / PLAN_FILE)}
    ctx.log(f"layermerge: {len(plan.segments)} segments of {L} convs, {len(edits.linearize)} "
            f"sites linearized, {len(edits.drop)} convs dropped; "
            + "; ".join(f"{r['runtime']}: {r['planned_ms']:.4g} ms planned of "
                        f"{r['unmerged_ms']:.4g} ms unmerged, {r['predicted_speedup']:.2f}x "
                        "predicted" for r in latency))

    planned = apply_edits(nnx.clone(original), edits)
    results["planned"] = evaluate_model(planned, cfg.train, ctx.data, ctx.mesh)
    results["finetune"] = {**finetune(ctx, original, planned),
                           **evaluate_model(planned, cfg.train, ctx.data, ctx.mesh)}
    fused, small = fuse_and_export(ctx, planned, original, cost="none", cuts=edits.cuts,
                                   latency=opts.latency, batch=opts.latency_batch)
    results.update(fused)
    results["fused"] = evaluate_model(small, cfg.train, ctx.data, ctx.mesh, splits=("test",))
    return MethodResult(results, report.report(results))
