"""layermerge's report: accuracy after each stage, the plan, its predicted and measured
latency, the site entropies, then the fused model."""
from __future__ import annotations

from jaxprune.methods.fuse_export import RUNTIME_NAMES, merge_sections
from jaxprune.report import Report, Section, Table, fmt


def report(results: dict) -> Report:
    search, ft = results["search"], results["finetune"]
    n_lin = len(search["edits"]["linearize"])
    rows = [["dense (original)", results["dense"]["val_acc"], results["dense"]["test_acc"]],
            [f"planned, {n_lin} sites linearized, before finetuning",
             results["planned"]["val_acc"], results["planned"]["test_acc"]],
            [f"finetuned {ft['epochs']} epochs" + (f", distilled (α = {ft['distill']:g})"
                                                   if ft.get("distill") else ""),
             ft["val_acc"], ft["test_acc"]],
            ["fused (as planned)", None, results["fused"]["test_acc"]]]
    sections = [Section("Accuracy", [Table(["model", "val acc (%)", "test acc (%)"], rows)])]

    space = results["space"]
    drop = space.get("drop_layers")
    latency = search["latency"]
    names = [RUNTIME_NAMES[r["runtime"]] for r in latency]
    segs = [[f"({s['start']}, {s['end']})", ", ".join(c for c in s["convs"]
                                                       if c not in s.get("dropped", ())),
             *([s["option"], ", ".join(s["dropped"]) or "—"] if drop else
               [" → ".join(map(str, s["pieces"]))]),
             "yes" if s["act_end"] else "no", *(s["T_ms"][r["runtime"]] for r in latency),
             s["importance"]]
            for s in search["segments"]]
    kind = (f"LayerMerge space (layer dropping): {space['positions']} positions, "
            f"{space['segments']} segments, {space['entries']} segment options, "
            f"{len(space['droppable'])} droppable convs" if drop else
            f"ECDC space: {space['positions']} positions, {space['segments']} segments")
    dropped = search["edits"].get("drop", [])
    sections.append(Section("Plan", [
        f"{kind}; breaks after strided convs at {space['breaks'] or 'none'}"
        + ("; a residual block with a break inside may merge as a whole (`strided_blocks`, "
           "beyond the papers)" if space.get("strided_blocks") else "") + ". Importance: "
        f"{search['importance']}. The plan is `{search['plan_file']}` (replay it with "
        "`method.plan`).",
        Table(["segment", "convs merged", *(["option", "convs dropped"] if drop else
                                            ["pieces (T_opt)"]),
               "activation kept at its end",
               *(f"{'T' if drop else 'T_opt'} ms ({name})" for name in names), "importance"],
              segs),
        "Linearized: " + (", ".join(search["edits"]["linearize"]) or "none") + ". Inserted: "
        + (", ".join(search["edits"]["insert_act"]) or "none") + "."
        + (f" Dropped (identity, residual add kept): {', '.join(dropped) or 'none'}."
           if drop else "")]))

    measured = (results.get("latency") or {}).get("runtimes") or {}
    rows = []
    for name, r in zip(names, latency):
        m = measured.get(r["runtime"])
        rows.append([name, r["unmerged_ms"], r["budget_ms"], r["planned_ms"], r["model_ms"],
                     r["predicted_model_ms"], f"{r['predicted_speedup']:.2f}x",
                     f"{m['dense_ms']:.3f} → {m['fused_ms']:.3f}" if m else None,
                     f"**{m['speedup']:.2f}x** ({m['speedup_by_burst']:.2f}x)" if m else None])
    T = "T" if drop else "T_opt"
    blocks = [
        Table(["runtime", "unmerged: Σ T(k, k+1) ms", "budget ms",
               f"planned: Σ {T} of the plan's segments ms",
               "whole model, BatchNorms folded, timed with the table ms",
               "predicted whole model: that − unmerged + planned ms", "predicted speed-up",
               "measured whole model, dense → fused ms",
               "measured speed-up (burst by burst)"], rows),
        (f"Replayed from `{search['replayed']}`: each budget is the one the plan was "
         "solved under in that runtime's table (none where it was not), and each T is this "
         "run's table's. " if search.get("replayed") else
         f"The plan meets the budget in each of the {len(rows)} runtimes at once (one exact "
         "DP, its grid a bin count per runtime). " if len(rows) > 1 else "")
        + ("Each segment runs as the pieces the plan gives it, and every runtime's T sums "
           "its table over them. " if not drop and len(rows) > 1 else "")
        + f"Batch {search['latency_batch']}, the table's device. "
        + " ".join(_timing(name, r.get("timing", "alone")) for name, r in zip(names, latency))
        + " The stem, the head, the adds kept explicit and the activations are in the "
        "model's time and in no segment's, and the prediction keeps them as they are, so the "
        "activations a plan removes are a gain it does not count. "
        + " ".join(_overhead(name, r["call_overhead_ms"], r.get("timing", "alone"))
                   for name, r in zip(names, latency))
        + f" DP grid: {search['bins']} bins"
        + (" per runtime." if len(rows) > 1 else ".")
        + (" Measured: against the dense model as built, so this also counts every "
           "BatchNorm folded into its conv, which the table's times have on both sides."
           if measured else "")]
    blocks += [f"In the {name} table, {len(r['clamped'])} segment option(s) saved more "
               "inside the model than their searched convs cost alone (they also remove "
               "the activations inside them, and a downsampling block its shortcut conv), "
               "and their T is taken as 0, so the prediction counts less than they save: "
               + ", ".join(",".join(map(str, k)) for k in r["clamped"]) + "."
               for name, r in zip(names, latency) if r.get("clamped")]
    blocks += [f"**The {name} prediction overstates the gain.** Its segments, timed one by "
               f"one, sum to {r['unmerged_ms']:.3f} ms, more than the whole model's "
               f"{r['model_ms']:.3f} ms: in {name} a conv costs less inside the model than "
               "alone (one program launched once, layers fused across), so taking the "
               "segments' times off the model takes off more than the model spends on them. "
               "Trust the measured figure."
               for name, r in zip(names, latency) if overstated(r)]
    sections.append(Section("Latency", blocks))
    if search.get("checks"):
        sections.append(_checks(search["checks"]))

    if search["site_entropy"]:
        src = search["site_source"]
        fell_back = [s for s, v in src.items() if v == "data"]
        text = []
        if search["importance"] == "bn_entropy" and fell_back:
            text.append("Not a BatchNorm output before the activation, so measured on one "
                        "epoch of training data instead: " + ", ".join(fell_back) + ".")
        linear = set(search["edits"]["linearize"])
        text.append(Table(["site", "entropy (bits)", "from", "kept"],
                          [[s, h, src[s], "no" if s in linear else "yes"]
                           for s, h in search["site_entropy"].items()]))
        text.append(f"Entropy kept: {fmt(search['entropy_kept'])} of "
                    f"{fmt(search['entropy_total'])} bits."
                    + (f" Paid for the dropped convs: {fmt(search['drop_cost'])} bits "
                       f"(objective {fmt(search['objective'])})."
                       if search.get("drop_cost") is not None else ""))
        sections.append(Section("Importance", text))
    table = search.get("finetune_table")
    if table:
        rows = [[f"({k.replace(',', ', ')})", d, table["importance"][k]]
                for k, d in table["delta"].items()]
        if table["normalisation"] == "exp":
            how, key = ("Importance = exp(Δ / 100) (LayerMerge).", "(i, j, option, a_i, a_j)")
        else:
            how, key = (f"Importance = Δ − α · mean Δ of the one-conv entries = Δ − "
                        f"{table['alpha']:g} · ({fmt(table['single_mean'])}) (ECDC).",
                        "(i, j, a_i, a_j)")
        sections.append(Section("Importance", [
            f"Each entry: the network with that segment merged (activations inside removed, "
            f"the convs its option drops removed; a one-conv segment re-initialised), "
            f"finetuned {table['epochs']} epoch(s) of {table['steps_per_epoch']} steps "
            f"({table['images_per_epoch']} images) at learning rate {table['lr']:g} from the "
            f"original, Δ = its validation "
            f"accuracy − the original's ({fmt(table['base_val_acc'])} %). {how} "
            f"Entries: `{table['file']}`.",
            Table([key, "Δ val acc (points)", "importance"], rows)]))
    sections += merge_sections(results, before="dense")
    return Report(f"layermerge: {results['model']} on {results['dataset']}", sections)


def _checks(checks: list[dict]) -> Section:
    """The plan checks (`check.py`): each plan timed, predicted against measured."""
    rows = [[c["check"], "yes" if c["kept"] else "", c["segments"], len(c["drop"]),
             RUNTIME_NAMES[r["runtime"]], f"{r['budget_ms']:.3f}",
             f"{r['predicted_speedup']:.2f}x", f"{r['model_ms']:.3f} → {r['plan_ms']:.3f}",
             f"{r['saved_ms']:.3f}", f"{r['needed_ms']:.3f}",
             f"**{r['speedup']:.2f}x**", "met" if r["met"] else "short"]
            for c in checks for r in c["runtimes"]]
    kept = next(c for c in checks if c["kept"])
    return Section("Plan check", [
        "Before finetuning, each plan's whole model (merged as planned, BatchNorms folded) "
        "was timed against the model the tables time, in its own process, burst against "
        "burst; a plan that saved less than the goal needs was searched again under a "
        "budget tightened by that shortfall (the table's predicted saving scaled by "
        "needed / saved). Kept: plan check "
        f"{kept['check']}" + ("." if all(r["met"] for r in kept["runtimes"]) else
                               ", the closest: **no plan checked met the goal in every "
                               "runtime**."),
        Table(["check", "kept", "segments", "convs dropped", "runtime", "budget ms",
               "predicted speed-up", "measured model → plan ms", "saved ms", "needed ms",
               "measured speed-up (from the saving, burst by burst)", "goal"], rows)])


def overstated(row: dict) -> bool:
    """Whether a runtime's prediction (a `results["search"]["latency"]` row) overstates
    the gain: its one-conv segments, each timed alone, sum to more than the whole model,
    so taking segments' times off the model takes off more than it spends on them. A table
    timed `in_model` prices segments by their saving in the model, where the one-conv
    entries cancel, so it is never flagged."""
    return row.get("timing", "alone") == "alone" and row["unmerged_ms"] > row["model_ms"]


def _timing(runtime: str, timing: str) -> str:
    if timing == "in_model":
        return (f"{runtime}: each one-conv segment timed alone as its layer, BatchNorm folded, "
                "and each longer segment option as the whole model with only it merged, its T "
                "the one-conv times of its convs less what it saved there.")
    return (f"{runtime}: each segment timed alone as its fused layer, BatchNorm folded, and "
            "the whole model with them.")


def _overhead(runtime: str, ms: float, timing: str) -> str:
    if timing == "in_model":
        return (f"The {runtime} table's one-conv entries keep the per-call overhead: in an "
                "in_model table they cancel out of every prediction.")
    if not ms:  # a table written before the overhead was recorded
        return f"The {runtime} table records no call overhead: its times are as measured."
    return (f"Every {runtime} T is its time less the runtime's per-call overhead, "
            f"{ms * 1000:.1f} us (an identity program timed with the segments), which a "
            "whole model pays once.")
