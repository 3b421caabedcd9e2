"""The latency table T(i, j) of a model's search space, measured on this device.

T(i, j) is the time of the one layer segment (i, j) becomes: the segment's region of the
graph (the sites strictly inside it linearized, from the tensor at position i to the last
layer before position j's activation; a segment inside a residual block stops before the
block's add, a segment spanning whole blocks takes their adds in) cut out as a model of its
own and fused by `jaxprune.merge` (`cost="none"`), so the layer timed is the layer the
merged model will run, border data included, at its real input shape (every pooling and
stride before it traced) and the table's batch. The stem, the head, the adds kept explicit
and the activations are not in T: a budget T0 covers the searched convolutions alone.
(The reference times each merged conv followed by a ReLU; the ReLU is left out here, since
whether a boundary keeps its activation is the plan's choice.)

Timing (`jaxprune.measure`): in the runtime the key names, `jax` (each segment's layer
jitted) or `torch` (each segment's layer exported by `converters.export` and its
`model.pt2` called eagerly, in processes that never import JAX), every segment in one fresh
process per round, the layers alternating call by call (`separate=False`), the median of
the rounds' medians, ms per call of `batch` images.

A table is JSON (`TABLE_SCHEMA`) with its `TableKey`: the model and its options, the input
size, the batch, the runtime, the device, the JAX version and the space's hash. A table is
only valid for the key it was measured under: `load_table` refuses another key, naming
each field that differs.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxprune.errors import UserError
from jaxprune.methods.layermerge.space import ModelSpace
from models.net import Net

TABLE_SCHEMA = "jaxprune.layermerge.latency/1"


@dataclasses.dataclass(frozen=True)
class TableKey:
    """Everything a latency table depends on. `runtime`: `jax` or `torch`; `device`: JAX's
    first device, or for torch `cpu: torch <version>` (the timing workers' torch runs on
    the CPU)."""
    arch: str
    options: dict
    input_size: tuple[int, int]
    batch: int
    runtime: str
    device: str
    jax_version: str
    space_hash: str

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d


def table_key(ms: ModelSpace, input_size, batch: int, runtime: str = "jax") -> TableKey:
    """The key of `ms`'s table measured here in `runtime` (`jax`: this process's first JAX
    device; `torch`: torch on the CPU)."""
    import importlib.metadata

    import jax
    if runtime == "torch":
        device = f"cpu: torch {importlib.metadata.version('torch')}"
    else:
        d = jax.devices()[0]
        device = f"{d.platform}: {d.device_kind}"
    return TableKey(ms.arch, dict(ms.options), tuple(int(s) for s in input_size), int(batch),
                    runtime, device, jax.__version__, ms.hash)


def segment_net(m: Net, ms: ModelSpace, i: int, j: int, input_size) -> Net:
    """Segment (i, j) of `m` as a model of its own, fused: the layer T(i, j) times.
    `m` is not changed."""
    from flax import nnx

    from jaxprune import merge
    from jaxprune.activation_sites import linearize
    from jaxprune.merging.profiling import tensor_shapes
    from jaxprune.merging.regions import GraphInfo
    from jaxprune.methods.depthshrinker.groups import Group, region_net
    work = nnx.clone(m)
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


def measure_table(m: Net, ms: ModelSpace, key: TableKey, *, rounds: int = 3, warmup: int = 3,
                  repeats: int = 20, threads: int | None = None) -> dict:
    """T(i, j) in ms for every segment of `ms` (see the module doc), as the table's JSON
    data: {"schema", "key", "ms": {"i,j": ms}, "spread_ms": {"i,j": [min, max]}}.
    `threads`: `jaxprune.measure`'s (default: one per core)."""
    import tempfile

    from jaxprune.measure import measure
    from jaxprune.measure.models import workloads
    ws, segment = [], {}
    with tempfile.TemporaryDirectory(prefix="jaxprune-table-") as scratch:  # torch's exports
        for i, j in ms.segments:
            sub = segment_net(m, ms, i, j, key.input_size)
            w, = workloads(f"{i},{j}", sub, sub.spec.input_size, batch=key.batch,
                           runtimes=(key.runtime,), scratch=Path(scratch))
            ws.append(w)
            segment[w.name] = f"{i},{j}"
        t = measure(ws, rounds=rounds, warmup=warmup, repeats=repeats, threads=threads,
                    separate=False)
    return {"schema": TABLE_SCHEMA, "key": key.as_dict(),
            "ms": {segment[w.name]: t[w.name].median_ms for w in ws},
            "spread_ms": {segment[w.name]: list(t[w.name].spread_ms) for w in ws},
            "rounds": rounds, "repeats": repeats, "threads": t[ws[0].name].threads}


def table_ms(data: dict, key: TableKey, source: str) -> dict[tuple[int, int], float]:
    """{(i, j): ms} of a table's JSON data, checked against `key`. Raises `UserError` for
    another schema or a key that differs (naming each field, both values); a segment
    missing from a hand-edited table is refused by `dp.t_opt`, which reads every one."""
    if not isinstance(data, dict) or data.get("schema") != TABLE_SCHEMA:
        raise UserError(f"{source} is not a layermerge latency table (schema "
                        f"{TABLE_SCHEMA!r}): give a latency_table.json a layermerge run wrote")
    got, want = data.get("key", {}), key.as_dict()
    differ = [f"{k} is {got.get(k)!r}, here {v!r}" for k, v in want.items() if got.get(k) != v]
    if differ:
        raise UserError(f"{source} was measured for another setting ({'; '.join(differ)}): "
                        "drop method.latency_table to measure a table here")
    table = {}
    for name, ms in data.get("ms", {}).items():
        i, j = (int(v) for v in name.split(","))
        table[(i, j)] = float(ms)
    return table


def load_table(path: str | Path, key: TableKey) -> dict[tuple[int, int], float]:
    """`table_ms` of the table file at `path`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"method.latency_table: {path} not found; give the latency_table.json "
                        "of an earlier layermerge run, or drop the key to measure one")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON ({e}): give a latency_table.json a layermerge "
                        "run wrote") from None
    return table_ms(data, key, str(path))


def latency_table(m: Net, ms: ModelSpace, key: TableKey, cache: Path,
                  given: str | Path | None = None, **timing) -> dict[tuple[int, int], float]:
    """{(i, j): ms} for `ms`: from `given` (a table file, checked against `key`), else from
    `cache` when an earlier run measured it there (checked likewise), else measured
    (`measure_table`, `timing` its settings) and written to `cache`."""
    from jaxprune.files import write_json_atomic
    if given is not None:
        return load_table(given, key)
    cache = Path(cache)
    if cache.is_file():
        return load_table(cache, key)
    data = measure_table(m, ms, key, **timing)
    write_json_atomic(cache, data)
    return table_ms(data, key, str(cache))
