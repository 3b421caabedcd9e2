"""The latency table T(i, j) of a model's search space, measured on this device.

T(i, j) is the time of the one layer segment (i, j) becomes: the segment's region of the
graph (the sites strictly inside it linearized, from the tensor at position i to the last
layer before position j's activation; a segment inside a residual block stops before the
block's add, a segment spanning whole blocks takes their adds in) cut out as a model of its
own and fused by `jaxprune.merge` (`cost="none"`), so the layer timed is the layer the
merged model will run, border data included, at its real input shape (every pooling and
stride before it traced) and the table's batch. The stem, the head, the adds kept explicit
and the activations are not in T (the whole model's time below has them).
(The reference times each merged conv followed by a ReLU; the ReLU is left out here, since
whether a boundary keeps its activation is the plan's choice.)

Timing (`jaxprune.measure`): in the runtime the key names, `jax` (each segment's layer
jitted) or `torch` (each segment's layer exported by `converters.export` and its
`model.pt2` called eagerly, in processes that never import JAX), every segment in one fresh
process per round, the layers alternating call by call (`separate=False`), the median of
the rounds' medians, ms per call of `batch` images. A segment called on its own pays the
runtime's per-call overhead (an exported torch program's input guards, JAX's dispatch),
which the whole model pays once: an identity program is timed with the segments
(`measure.call_overhead`) and T is each time less it (`measure.in_model_ms`). Without
that, every extra segment of a plan costs one more call overhead in the table but not in
the model, and the table credits merging with more than it gains. The file keeps the
times as measured and the overhead (`overhead_ms`; none in tables written before it was
recorded).

The whole model (its BatchNorms folded, no run fused: what the unmerged plan runs, stem,
head, adds and activations included) is timed with the segments too (`model_ms`), so a
plan's whole-model latency is predicted as model_ms − Σ T(unmerged) + Σ T(plan): the time
the plan saves, taken off the model as measured. The budget is on that prediction.

With layer dropping (LayerMerge) every option of a segment is timed, as the layer merge
makes of the segment with that option's convs dropped: T(i, j, option), named "i,j,option"
in the table (ECDC's: "i,j").

`timing: in_model` prices what a merge saves inside the whole model instead: each option of
a segment of two or more convs is timed as the whole model with only that segment merged
(its convs dropped, the sites inside it linearized; `in_model_net`), and every other conv
alone, BatchNorms folded; the model with no segment merged is `model_ms`. T(i, j, option)
is then Σ T(k, k+1) over its convs less what it saves, model_ms − that model's time (round
by round, the median of the differences: `in_model_saved_ms`), so a
plan's predicted model is model_ms less the sum of its segments' savings (the one-conv
entries, timed alone, cancel; they keep the call overhead, which would only clamp them).
It costs a whole model per option, and it is what a runtime needs whose layers cost less
inside the model than alone: a jitted model is one XLA program, fused across layers, so on
a CPU a JAX table of layers timed alone can sum to more than the model (the report flags
that).

A table is JSON (`TABLE_SCHEMA`) with its `TableKey`: the model and its options, the input
size, the batch, the runtime, the device, the JAX version, the space's hash, whether it
drops layers (a table without that field is ECDC's) and its timing (without: `alone`). A table is
only valid for the key it was measured under: `load_table` refuses another key, naming
each field that differs.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from jaxprune.errors import UserError
from jaxprune.methods.layermerge.space import ModelSpace
from models.net import Net

TABLE_SCHEMA = "jaxprune.layermerge.latency/1"


@dataclasses.dataclass(frozen=True)
class TableKey:
    """Everything a latency table depends on. `runtime`: `jax` or `torch`; `device`: JAX's
    first device, or for torch `cpu: torch <version>` (the timing workers' torch runs on
    the CPU); `timing`: `alone` or `in_model` (see the module doc)."""
    arch: str
    options: dict
    input_size: tuple[int, int]
    batch: int
    runtime: str
    device: str
    jax_version: str
    space_hash: str
    drop_layers: bool = False
    timing: str = "alone"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d


@dataclasses.dataclass(frozen=True)
class LatencyTable:
    """A latency table as the search reads it: `T` in ms per call of the table's batch,
    each entry less the call overhead, keyed (i, j), or (i, j, option) with layer dropping;
    `overhead_ms`, the per-call overhead taken off each entry (0 for `in_model`, see
    `taken_off_ms`); `model_ms`, the whole model (BatchNorms folded, no run fused) timed
    with them; `clamped`, the keys of a `timing: in_model` table whose T came out below 0
    and was taken as 0: the segment saved more in the model than its searched convs cost
    alone (it also removes the activations inside it, and a downsampling block its
    shortcut conv; or the table's noise), so the prediction counts less than it saves."""
    T: dict[tuple, float]
    overhead_ms: float
    model_ms: float
    clamped: tuple[tuple, ...] = ()  # in_model entries that saved more than their convs cost

    def model_after(self, unmerged_ms: float, planned_ms: float) -> float:
        """The predicted whole-model latency (ms) of a plan whose segments sum to
        `planned_ms` where every conv alone sums to `unmerged_ms`: the model as measured,
        less what the plan saves on the searched convs."""
        return self.model_ms - unmerged_ms + planned_ms

    def searched_budget(self, unmerged_ms: float, model_ms: float) -> float:
        """The budget on the searched convs (ms) that lets the predicted whole model take
        `model_ms`: `model_after`'s inverse."""
        return model_ms - self.model_ms + unmerged_ms


def table_key(ms: ModelSpace, input_size, batch: int, runtime: str = "jax",
              timing: str = "alone") -> TableKey:
    """The key of `ms`'s table measured here in `runtime` (`jax`: this process's first JAX
    device; `torch`: torch on the CPU), each segment timed as `timing` says."""
    import importlib.metadata

    import jax
    if runtime == "torch":
        device = f"cpu: torch {importlib.metadata.version('torch')}"
    else:
        d = jax.devices()[0]
        device = f"{d.platform}: {d.device_kind}"
    return TableKey(ms.arch, dict(ms.options), tuple(int(s) for s in input_size), int(batch),
                    runtime, device, jax.__version__, ms.hash, ms.drop_layers, timing)


def _entry_name(i: int, j: int, option: str, ms: ModelSpace) -> str:
    return f"{i},{j},{option}" if ms.drop_layers else f"{i},{j}"


def segment_net(m: Net, ms: ModelSpace, i: int, j: int, input_size,
                option: str | None = None) -> Net:
    """Segment (i, j) of `m` as a model of its own, fused: the layer T(i, j) (with layer
    dropping: T(i, j, option), that option's convs dropped) times. `m` is not changed."""
    from flax import nnx

    from jaxprune import merge
    from jaxprune.activation_sites import linearize
    from jaxprune.merging.profiling import tensor_shapes
    from jaxprune.merging.regions import GraphInfo
    from jaxprune.methods.depthshrinker.groups import Group, region_net
    from jaxprune.methods.layermerge.space import drop_conv
    work = nnx.clone(m)
    for conv in ms.dropped(i, j, option) if option is not None else ():
        drop_conv(work, conv)
    linearize(work, [p.site for p in ms.positions[i + 1:j] if p.site])
    g = GraphInfo(work)
    src, end = ms.positions[i].tensor, ms.positions[j]
    dst = g.inputs[end.tensor][0] if end.site == end.tensor else end.tensor
    nodes = g.region(src, dst)
    if nodes is None:  # ends at a residual add whose block it does not span: stop before it
        dst = next(t for t in g.inputs[dst] if t == src or src in g.anc[t])
        nodes = g.region(src, dst)
    if nodes is None:
        raise UserError(f"segment ({i}, {j}) of {ms.arch} is not one region of the graph")
    order = tuple(n for n in g.order if n in nodes)
    shapes = tensor_shapes(work, tuple(input_size))
    sub = region_net(work, Group(0, (), order, src, None, None), shapes)
    return merge(sub, input_size=sub.spec.input_size, cost="none", verify=False)


def in_model_net(m: Net, ms: ModelSpace, input_size, entry: tuple | None = None) -> Net:
    """The whole model, BatchNorms folded, with only the segment option `entry`
    (i, j, option) merged (its convs dropped, the sites inside it linearized) and every
    other conv alone, each boundary keeping the activation the model has there; with no
    `entry`, no segment merged. What `timing: in_model` times. `m` is not changed."""
    from jaxprune.methods.layermerge.dp import Plan, PlanSegment
    L = ms.space.positions
    i, j, option = entry if entry is not None else (0, 1, None)
    bounds = [*range(i + 1), *range(j, L + 1)]
    segments = []
    for a, b in zip(bounds, bounds[1:]):
        acts = ms.end_acts(a, b)
        want = int(bool(ms.positions[b].site))
        segments.append(PlanSegment(a, b, option if (a, b) == (i, j) and option else
                                    ms.space.options[(a, b)][0],
                                    bool(want if want in acts else acts[0]), 0.0, 0, 0.0))
    return plan_net(m, ms.edits(Plan(L, tuple(segments), 0.0, 0.0, 0, 1.0, 1, 1.0, "ceil")),
                    input_size)


def plan_net(m: Net, edits, input_size) -> Net:
    """`m` with a plan's `Edits` applied and merged as the plan says (`cuts`), BatchNorms
    folded: the model the plan runs, as the table times it. `m` is not changed."""
    from flax import nnx

    from jaxprune import merge
    from jaxprune.methods.layermerge.space import apply_edits
    return merge(apply_edits(nnx.clone(m), edits), input_size=tuple(input_size), cost="none",
                 cuts=edits.cuts, verify=False)


def model_net(m: Net, ms: ModelSpace, key: TableKey) -> Net:
    """The whole model a table of `key` times with its segments (`model_ms`): BatchNorms
    folded, no run fused."""
    from jaxprune import merge
    from jaxprune.merging.fuse import fold_only_cuts
    if key.timing == "in_model":
        return in_model_net(m, ms, key.input_size)
    return merge(m, input_size=key.input_size, cost="none", cuts=fold_only_cuts(m),
                 verify=False)


def measure_table(m: Net, ms: ModelSpace, key: TableKey, *, rounds: int = 3, warmup: int = 3,
                  repeats: int = 20, threads: int | None = None) -> dict:
    """T(i, j) in ms for every segment of `ms` (every option of it, with layer dropping;
    see the module doc), as the table's JSON data: {"schema", "key", "ms": {"i,j": ms},
    "spread_ms": {"i,j": [min, max]}, "overhead_ms", "overhead_spread_ms", "model_ms",
    "model_spread_ms"} ("i,j,option" with layer dropping; "ms" as measured, the call
    overhead not yet taken off). With `key.timing` `in_model`, "ms" holds the one-conv
    segments and "in_model_ms" ("in_model_spread_ms") the whole model with each longer
    segment option merged (`in_model_net`), "in_model_saved_ms" what each saves on the
    model, round by round (`Timings.paired_saving_ms`). `threads`: `jaxprune.measure`'s (default:
    one per core)."""
    import tempfile

    from jaxprune.measure import call_overhead, measure
    from jaxprune.measure.models import workloads
    in_model = key.timing == "in_model"
    overhead = call_overhead(key.runtime)
    folded = model_net(m, ms, key)
    with tempfile.TemporaryDirectory(prefix="jaxprune-table-") as scratch:  # torch's exports
        def workload(name, net):
            w, = workloads(name, net, net.spec.input_size, batch=key.batch,
                           runtimes=(key.runtime,), scratch=Path(scratch))
            return w
        alone, whole, small, large = {}, {}, [], []
        for i, j, o in ms.entries():
            name = _entry_name(i, j, o, ms)
            if in_model and j - i >= 2:
                w = workload(f"in model {name}", in_model_net(m, ms, key.input_size, (i, j, o)))
                whole[w.name] = name
                large.append(w)
            else:
                w = workload(name, segment_net(m, ms, i, j, key.input_size, o))
                alone[w.name] = name
                small.append(w)
        # The calls alternate in this order, round and round. A whole model called right
        # after a small program runs slower (measured: 0.03-0.06 ms of 2.2 in JAX, 0.15 of
        # 4 in torch, batch 32), and every in_model saving is taken off the model's time:
        # so the model comes last, after a whole model, never after the small programs.
        model = workload("model", folded)
        t = measure([overhead, *small, *large, model], rounds=rounds, warmup=warmup,
                    repeats=repeats, threads=threads, separate=False)
    extra = {f"in_model{k}": {whole[w]: v(t[w]) for w in whole}
             for k, v in (("_ms", lambda x: x.median_ms),
                          ("_spread_ms", lambda x: list(x.spread_ms)),
                          ("_saved_ms", lambda x: t.paired_saving_ms(model.name, x.name)))
             } if in_model else {}
    return {"schema": TABLE_SCHEMA, "key": key.as_dict(),
            "ms": {alone[w]: t[w].median_ms for w in alone},
            "spread_ms": {alone[w]: list(t[w].spread_ms) for w in alone}, **extra,
            "overhead_ms": t[overhead.name].median_ms,
            "overhead_spread_ms": list(t[overhead.name].spread_ms),
            "model_ms": t[model.name].median_ms, "model_spread_ms": list(t[model.name].spread_ms),
            "rounds": rounds, "repeats": repeats, "threads": t[overhead.name].threads}


def table_ms(data: dict, key: TableKey, source: str) -> dict[tuple, float]:
    """{(i, j): ms} of a table's JSON data ({(i, j, option): ms} with layer dropping): each
    entry as measured less the table's call overhead (`measure.in_model_ms`; a table
    written before the overhead was recorded has none), checked against `key`. Raises
    `UserError` for another schema or a key that differs (naming each field, both
    values), a malformed entry name, and an `in_model` table without a one-conv entry its
    longer entries are priced from; another entry missing from a hand-edited table is
    refused by `dp.t_opt` or `dp.solve`, which read every one."""
    return _entries(data, key, source)[0]


def _entries(data: dict, key: TableKey, source: str) -> tuple[dict[tuple, float], tuple]:
    """`table_ms` and the keys of its `in_model` entries clamped at 0."""
    from jaxprune.measure import in_model_ms
    if not isinstance(data, dict) or data.get("schema") != TABLE_SCHEMA:
        raise UserError(f"{source} is not a layermerge latency table (schema "
                        f"{TABLE_SCHEMA!r}): give a latency_table.json a layermerge run wrote")
    got, want = {"drop_layers": False, "timing": "alone", **data.get("key", {})}, key.as_dict()
    differ = [f"{k} is {got.get(k)!r}, here {v!r}" for k, v in want.items() if got.get(k) != v]
    if differ:
        order = (" (with several runtimes, method.latency_table lists one table per runtime "
                 "in method.runtime's order)" if got.get("runtime") != want["runtime"] else "")
        raise UserError(f"{source} was measured for another setting ({'; '.join(differ)}): "
                        f"drop method.latency_table to measure a table here{order}")
    table, overhead = {}, taken_off_ms(data, key, source)
    for name, ms in data.get("ms", {}).items():
        table[_entry_key(name, source)] = in_model_ms(_time(ms, name, source), overhead)
    clamped = []
    if key.timing == "in_model":  # Σ of its one-conv entries less what it saves in the model
        model = _time(data.get("model_ms"), "model_ms", source)
        single = {k[0]: v for k, v in table.items() if k[1] == k[0] + 1}
        paired = data.get("in_model_saved_ms")   # (absent from tables written before it)
        for name, ms in data.get("in_model_ms", {}).items():
            k = _entry_key(name, source)
            missing = [p for p in range(k[0], k[1]) if p not in single]
            if missing:
                raise UserError(f"{source}: in_model_ms {name} is priced from the one-conv "
                                f"entries, and ms has none for ({missing[0]}, "
                                f"{missing[0] + 1}): give a latency_table.json a layermerge "
                                "run wrote, or drop method.latency_table to measure one")
            saved = model - _time(ms, f"in_model_ms {name}", source)
            if paired is not None:
                saved = _time(paired.get(name), f"in_model_saved_ms {name}", source, signed=True)
            t = math.fsum(single[p] for p in range(k[0], k[1])) - saved
            if t < 0:
                clamped.append(k)
            table[k] = max(t, 0.0)
    return table, tuple(clamped)


def _entry_key(name: str, source: str) -> tuple:
    """(i, j) or (i, j, option) from a table's entry name "i,j" or "i,j,option"."""
    parts = name.split(",")
    if not (2 <= len(parts) <= 3 and parts[0].isdigit() and parts[1].isdigit()):
        raise UserError(f"{source}: entry {name!r} is not named \"i,j\" or \"i,j,option\": "
                        "give a latency_table.json a layermerge run wrote")
    return (int(parts[0]), int(parts[1]), *parts[2:])


def taken_off_ms(data: dict, key: TableKey, source: str) -> float:
    """The per-call overhead a table's entries are taken off by (`table_ms`): the recorded
    one, 0 for a table written before it was recorded, and 0 for an `in_model` table,
    whose one-conv entries cancel out of every prediction: there it would only push them
    (and the longer entries priced from them) to the clamp at 0, and the overhead an
    entry pays varies with what ran before it (0.1-0.3 ms in one torch table)."""
    overhead = _time(data.get("overhead_ms", 0.0), "overhead_ms", source)
    return overhead if key.timing == "alone" else 0.0


def _time(value, name: str, source: str, *, signed: bool = False) -> float:
    """A time of the table file `source` (ms), refused unless a finite number >= 0 (any
    finite number with `signed`: a saving, below 0 for a merge that costs time)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and (signed or value >= 0)):
        raise UserError(f"{source}: {name} is {value!r}, not a time in ms "
                        f"({'a finite number' if signed else 'a number >= 0'}): give a "
                        "latency_table.json a layermerge run wrote, or drop "
                        "method.latency_table to measure one")
    return float(value)


def load_table(path: str | Path, key: TableKey) -> dict[tuple, float]:
    """`table_ms` of the table file at `path`."""
    return table_ms(_read_given(path), key, str(path))


def _read_given(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"method.latency_table: {path} not found; give the latency_table.json "
                        "of an earlier layermerge run, or drop the key to measure one")
    return _read(path)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON ({e}): give a latency_table.json a layermerge "
                        "run wrote") from None


def latency_table(m: Net, ms: ModelSpace, key: TableKey, cache: Path,
                  given: str | Path | None = None, **timing) -> LatencyTable:
    """`ms`'s `LatencyTable`: from `given` (a table file, checked against `key`), else from
    `cache` when an earlier run measured it there (checked likewise), else measured
    (`measure_table`, `timing` its settings) and written to `cache`. A table written before
    the whole model was timed with its entries (the budget is on the whole model) is
    measured again in `cache`, and refused as `given`. In a multi-process run, process 0
    reads or measures the cached table and every process gets it from there
    (`distributed.broadcast_json`), so all of them solve the same search."""
    from jaxprune import distributed
    from jaxprune.files import write_json_atomic
    if given is not None:
        data, source = _read_given(given), str(given)
    else:
        cache, data, source = Path(cache), None, str(cache)
        if distributed.is_main():
            data = _read(cache) if cache.is_file() else None
            if data is None or "model_ms" not in data:
                data = measure_table(m, ms, key, **timing)
                write_json_atomic(cache, data)
        data = distributed.broadcast_json(data)
    T, clamped = _entries(data, key, source)
    if "model_ms" not in data:
        raise UserError(f"{source} was measured before the whole model was timed with the "
                        "segments, which the budget needs: drop method.latency_table to "
                        "measure the table again")
    return LatencyTable(T, taken_off_ms(data, key, source),
                        _time(data["model_ms"], "model_ms", source), clamped)
