"""The latency table of a layermerge search space (`jaxprune.methods.layermerge.latency`):
each segment is timed as the layer `merge` makes of it in the planned model, tables are
refused for another model, size, batch, runtime, device or space, and one tiny table
measured through `jaxprune.measure` (in JAX and in torch) and cached."""
import json

import numpy as np
import pytest
from flax import nnx

import jaxprune
import models
from jaxprune.errors import UserError
from jaxprune.methods.layermerge.dp import MERGED, Plan, PlanSegment
from jaxprune.methods.layermerge.latency import (
    TABLE_SCHEMA, in_model_net, latency_table, load_table, measure_table, segment_net,
    table_key)
from jaxprune.methods.layermerge.space import apply_edits, build_space
from models.net import randomize_bn

HW = (32, 32)


@pytest.fixture(scope="module")
def resnet():
    m = randomize_bn(models.create("resnet18_cifar", num_classes=10, width=4))
    return m, build_space(m)


def test_segment_is_timed_as_the_layer_merge_makes(resnet):
    m, ms = resnet
    bounds = sorted(ms.space.forced)     # (0, 4): two residual blocks in one conv, ...
    plan = Plan(16, tuple(PlanSegment(i, j, MERGED, True, 0.0, 0, 0.0)
                          for i, j in zip(bounds, bounds[1:])), 0.0, 0.0, 0, 1.0, 1, 1.0, "ceil")
    planned = apply_edits(nnx.clone(m), ms.edits(plan))
    fused = jaxprune.merge(planned, input_size=HW, cost="none", verify=False)
    for i, j in [(0, 4), (4, 5), (5, 6), (6, 8)]:
        sub = segment_net(m, ms, i, j, HW)
        (name, layer), = sub.named_layers()   # one layer
        assert name == ms.convs(i, j)[0]
        assert type(layer) is type(fused.layers[name])
        # the same layer; `model_size` (the smallest input of the model a fused layer sits
        # in) is the segment's own there, the whole model's here
        mine, theirs = layer.config(), fused.layers[name].config()
        mine.pop("model_size", None)
        theirs.pop("model_size", None)
        assert mine == theirs
    # its input is the tensor at position i, pooled and strided as in the model
    assert segment_net(m, ms, 0, 4, HW).spec.input_size == (16, 16)
    assert segment_net(m, ms, 5, 6, HW).spec.input_size == (8, 8)
    assert jaxprune.linearized(m) == []   # the model itself is left as it was


def _table(key, ms):
    return {"schema": TABLE_SCHEMA, "key": key.as_dict(),
            "ms": {f"{i},{j}": 1.0 for i, j in ms.segments}}


def test_a_cached_table_without_the_model_time_is_measured_again(resnet, tmp_path,
                                                                  monkeypatch):
    """The run's own cached table from before the whole model was timed is replaced by a
    new measurement (the budget needs `model_ms`); one with it is read as it is."""
    from jaxprune.methods.layermerge import latency
    m, ms = resnet
    key, cache = table_key(ms, HW, 2), tmp_path / "latency_table.json"
    cache.write_text(json.dumps(_table(key, ms)))
    measured = []
    monkeypatch.setattr(latency, "measure_table", lambda *a, **k: measured.append(1) or
                        {**_table(key, ms), "overhead_ms": 0.25, "model_ms": 30.0})
    table = latency_table(m, ms, key, cache)
    assert measured == [1] and json.loads(cache.read_text())["model_ms"] == 30.0
    assert (table.model_ms, table.overhead_ms) == (30.0, 0.25)
    assert table.T == {s: 0.75 for s in ms.segments}
    assert latency_table(m, ms, key, cache) == table and measured == [1]


def test_a_table_is_read_less_its_call_overhead(resnet, tmp_path):
    """Each entry is taken off the per-call overhead timed with it (a whole model pays it
    once, not once per segment), never below 0; a table written before the overhead was
    recorded is read as measured."""
    m, ms = resnet
    key, path = table_key(ms, HW, 2), tmp_path / "t.json"
    data = _table(key, ms)
    data["ms"][next(iter(data["ms"]))] = 0.1
    path.write_text(json.dumps({**data, "overhead_ms": 0.25}))
    first, *rest = ms.segments
    assert load_table(path, key) == {first: 0.0, **{s: 0.75 for s in rest}}
    path.write_text(json.dumps(data))
    assert load_table(path, key) == {first: 0.1, **{s: 1.0 for s in rest}}
    for bad in (None, "0.2", -0.1):   # a hand-edited file: one line naming the field
        path.write_text(json.dumps({**data, "overhead_ms": bad}))
        with pytest.raises(UserError, match=rf"t.json: overhead_ms is {bad!r}, not a time"):
            load_table(path, key)


def test_table_from_another_setting_is_refused(resnet, tmp_path):
    m, ms = resnet
    key = table_key(ms, HW, 2)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_table(key, ms)))
    assert load_table(path, key) == {s: 1.0 for s in ms.segments}
    other = table_key(ms, (16, 16), 4)
    with pytest.raises(UserError, match=r"measured for another setting \(input_size is \[32, 32\], "
                                        r"here \[16, 16\]; batch is 2, here 4\)"):
        load_table(path, other)
    # a JAX table for a torch run: the runtime is named (and torch's device)
    with pytest.raises(UserError, match=r"runtime is 'jax', here 'torch'; device is 'cpu: "
                                        r".*', here 'cpu: torch "):
        load_table(path, table_key(ms, HW, 2, runtime="torch"))
    with pytest.raises(UserError, match=r"timing is 'alone', here 'in_model'"):
        load_table(path, table_key(ms, HW, 2, timing="in_model"))
    # a table of a version before timings: its segments were timed alone
    data = _table(key, ms)
    del data["key"]["timing"]
    path.write_text(json.dumps(data))
    assert load_table(path, key) == {s: 1.0 for s in ms.segments}
    with pytest.raises(UserError, match=r"timing is 'alone', here 'in_model'"):
        load_table(path, table_key(ms, HW, 2, timing="in_model"))
    data["key"]["device"] = "gpu: NVIDIA H200"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="device is 'gpu: NVIDIA H200', here 'cpu"):
        load_table(path, key)
    mb = build_space(nnx.eval_shape(lambda: models.create("mobilenet_v2_cifar", width_mult=0.1)))
    with pytest.raises(UserError, match="arch is 'resnet18_cifar', here 'mobilenet_v2_cifar'.*"
                                        "space_hash is"):
        load_table(tmp_path / "t.json", table_key(mb, HW, 2))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not a layermerge latency table"):
        load_table(tmp_path / "bad.json", key)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["jax", "torch"])
def test_table_is_measured_once_and_cached(resnet, tmp_path, runtime):
    """In JAX each segment's layer is jitted; in torch it is exported and its model.pt2 run
    eagerly (a piece of the network: `width` input channels, not 3). The whole model is
    timed with them."""
    m, ms = resnet
    key = table_key(ms, HW, 2, runtime=runtime)
    cache = tmp_path / "latency_table.json"
    table = latency_table(m, ms, key, cache, rounds=1, warmup=1, repeats=2)
    data = json.loads(cache.read_text())
    assert data["key"] == key.as_dict() and data["rounds"] == 1
    assert data["key"]["runtime"] == runtime
    # each entry as measured, less the runtime's per-call overhead timed beside them
    assert table.overhead_ms == data["overhead_ms"] > 0
    assert set(table.T) == set(ms.segments)
    assert table.T == {s: max(data["ms"][f"{s[0]},{s[1]}"] - table.overhead_ms, 0.0)
                       for s in table.T}
    assert any(v > 0 for v in table.T.values())
    assert table.model_ms == data["model_ms"] > 0
    assert latency_table(m, ms, key, cache) == table   # read back, not measured again
    del data["model_ms"]    # a table of an older version: refused when given
    cache.write_text(json.dumps(data))
    with pytest.raises(UserError, match="was measured before the whole model was timed"):
        latency_table(m, ms, key, tmp_path / "elsewhere.json", given=cache)


def test_in_model_timing_times_the_whole_model_with_one_segment_merged(resnet):
    """`timing: in_model`: with no segment merged, the model computes what it did, every
    conv a layer of its own; with one, that segment is the one layer the planned model's
    merge makes of it, the rest unchanged."""
    m, ms = resnet
    x = np.random.default_rng(0).normal(size=(2, *HW, 3)).astype(np.float32)
    base = in_model_net(m, ms, HW)
    ref = nnx.clone(m)
    ref.eval()
    np.testing.assert_allclose(base(x), ref(x), atol=1e-4)
    convs = [c for i, j in ms.segments if j == i + 1 for c in ms.convs(i, j)]
    assert all(c in base.layers for c in convs)
    one = in_model_net(m, ms, HW, (0, 4, MERGED))
    gone = set(base.layers) - set(one.layers)     # layer1's convs, adds, inner ReLUs
    assert set(ms.convs(0, 4)[1:]) <= gone and all(n.startswith("layer1.") for n in gone)
    assert set(one.layers) <= set(base.layers)
    plan = Plan(16, (PlanSegment(0, 4, MERGED, True, 0.0, 0, 0.0),
                     *(PlanSegment(k, k + 1, MERGED, True, 0.0, 0, 0.0) for k in range(4, 16))),
                0.0, 0.0, 0, 1.0, 1, 1.0, "ceil")
    planned = apply_edits(nnx.clone(m), ms.edits(plan))
    planned.eval()
    np.testing.assert_allclose(one(x), planned(x), atol=1e-4)
    assert jaxprune.linearized(m) == []   # the model itself is left as it was


def test_a_plan_check_times_the_tables_model_against_the_plans(resnet, monkeypatch):
    """`check.measure_plan` times, in each runtime of the tables, the model the table
    times (BatchNorms folded, no run fused) and the plan merged as planned, and sets the
    plan's saving, burst by burst, against what the target needs (faked timings: the
    plan saves 2 ms of 10, then 3 of 10 in the machine's slow burst)."""
    from jaxprune.measure import Timing, Timings
    from jaxprune.measure import models as measured
    from jaxprune.methods.layermerge.check import measure_plan
    from jaxprune.methods.layermerge.latency import LatencyTable
    m, ms = resnet
    plan = Plan(16, (PlanSegment(0, 4, MERGED, True, 0.0, 0, 0.0),
                     *(PlanSegment(k, k + 1, MERGED, True, 0.0, 0, 0.0) for k in range(4, 16))),
                0.0, 0.0, 0, 1.0, 1, 1.0, "ceil")
    edits = ms.edits(plan)
    timed = {}

    def fake(models_, hw, *, batch, runtimes, rounds, bursts, repeats):
        timed.update(models_, hw=tuple(hw), batch=batch, runtimes=list(runtimes))
        bursts_ = {"model": [10.0, 12.0, 10.0], "plan": [8.0, 9.0, 8.0]}
        return Timings({f"{n} {rt}": Timing(f"{n} {rt}", rt, 10.0 if n == "model" else 8.0,
                                            (min(b), max(b)), b, 20, 1, "cpu", {})
                        for n, b in bursts_.items() for rt in runtimes}, rounds, True, None)
    monkeypatch.setattr(measured, "model_latency", fake)
    keys = [table_key(ms, HW, 2, rt) for rt in ("torch", "jax")]
    tables = [(k, LatencyTable({}, 0.0, 12.0)) for k in keys]
    checks = measure_plan(m, ms, edits, tables, [9.0, 9.0], [7.0, 8.0], [7.5, 8.5],
                          lambda model: model / 1.3)
    assert (timed["hw"], timed["batch"], timed["runtimes"]) == (HW, 2, ["torch", "jax"])
    x = np.random.default_rng(0).normal(size=(2, *HW, 3)).astype(np.float32)
    ref = nnx.clone(m)
    ref.eval()
    np.testing.assert_allclose(timed["model"](x), ref(x), atol=1e-4)
    planned = apply_edits(nnx.clone(m), edits)
    planned.eval()
    np.testing.assert_allclose(timed["plan"](x), planned(x), atol=1e-4)
    assert set(ms.convs(0, 4)[1:]) <= set(timed["model"].layers) - set(timed["plan"].layers)
    torch_check, jax_check = checks
    assert (torch_check.runtime, jax_check.runtime) == ("torch", "jax")
    assert torch_check.saved_ms == 2.0          # median of 2, 3, 2: burst by burst
    assert torch_check.needed_ms == pytest.approx(10.0 - 10.0 / 1.3)   # 2.31 ms: short
    assert not torch_check.met and torch_check.speedup == pytest.approx(1.25)
    assert (torch_check.predicted_saved_ms, jax_check.predicted_saved_ms) == (2.0, 1.0)
    assert torch_check.predicted_speedup == pytest.approx(12.0 / 10.0)   # 12 - 9 + 7
    assert jax_check.budget_ms == 8.5
    # the next search must predict needed / saved times the 2 ms the table predicted
    assert torch_check.tightened_budget(9.0) == pytest.approx(9.0 - 2.0 * (10 - 10 / 1.3) / 2)


@pytest.mark.slow
def test_an_in_model_table_prices_a_segment_by_what_it_saves_in_the_model(resnet, tmp_path):
    """Measured in JAX: the one-conv entries are timed alone, each longer segment as the
    whole model with it merged, and its T is its convs' entries less what it saves."""
    m, ms = resnet
    key = table_key(ms, HW, 2, timing="in_model")
    table = latency_table(m, ms, key, tmp_path / "t.json", rounds=1, warmup=1, repeats=2)
    data = json.loads((tmp_path / "t.json").read_text())
    longer = [s for s in ms.segments if s[1] - s[0] >= 2]
    assert set(data["in_model_ms"]) == {f"{i},{j}" for i, j in longer}
    assert set(data["ms"]) == {f"{i},{j}" for i, j in ms.segments if j == i + 1}
    assert table.overhead_ms == 0 and data["overhead_ms"] > 0   # recorded, not taken off
    for i, j in longer:   # what it saves: round by round, the median of the differences
        saved = data["in_model_saved_ms"][f"{i},{j}"]
        assert data["model_spread_ms"][0] - data["in_model_spread_ms"][f"{i},{j}"][1] <= \
            saved <= data["model_spread_ms"][1] - data["in_model_spread_ms"][f"{i},{j}"][0]
        convs = sum(data["ms"][f"{k},{k + 1}"] for k in range(i, j))
        assert table.T[(i, j)] == pytest.approx(max(convs - saved, 0.0))
    assert table.model_ms == data["model_ms"] > 0


def test_the_whole_model_is_timed_last_and_savings_are_paired(resnet, monkeypatch):
    """The calls alternate in the order given, and a whole model called right after a
    small program runs slower: the unmerged model, off which every in_model saving is
    taken, comes last, after the whole models with one segment merged, and the small
    programs (the call overhead, the one-conv segments) come first. A saving is the median
    of the round-by-round differences (hand-made rounds, one slow for every workload)."""
    from jaxprune import measure as measuring
    from jaxprune.measure import Timing, Timings
    m, ms = resnet
    order = []

    def fake(ws, **_):
        order.extend(w.name.removesuffix(" jax") for w in ws)   # (named by runtime)
        def timing(w, base):
            rounds = [base, base * 2, base]   # round 2: the machine at half speed
            return Timing(w.name, "jax", base, (base, 2 * base), rounds, 1, 1, "cpu", {})
        return Timings({w.name: timing(w, 10.0 if w.name == "model jax" else
                                       9.0 if w.name.startswith("in model") else 1.0)
                        for w in ws}, 3, False, None)
    monkeypatch.setattr(measuring, "measure", fake)
    data = measure_table(m, ms, table_key(ms, HW, 2, timing="in_model"), rounds=3)
    longer = [f"in model {i},{j}" for i, j in ms.segments if j - i >= 2]
    assert order[-1] == "model" and order[-1 - len(longer):-1] == longer
    assert all(not n.startswith("in model") for n in order[:-1 - len(longer)])
    assert set(data["in_model_saved_ms"].values()) == {1.0}   # median of 1, 2, 1


def test_an_in_model_file_is_read_as_its_savings(resnet, tmp_path):
    """A given in_model table: a longer segment's T is its one-conv entries (as measured:
    they cancel out of every prediction, so the call overhead stays in) less what it saved
    in the model; one that saved more is taken as 0 and recorded; a missing one-conv entry
    or a malformed name is one line."""
    m, ms = resnet
    key, path = table_key(ms, HW, 2, timing="in_model"), tmp_path / "t.json"
    singles = {f"{i},{j}": 1.25 for i, j in ms.segments if j == i + 1}
    (a, b), (c, d) = [s for s in ms.segments if s[1] - s[0] >= 2][:2]
    data = {"schema": TABLE_SCHEMA, "key": key.as_dict(), "ms": singles, "overhead_ms": 0.25,
            "model_ms": 30.0, "in_model_ms": {f"{a},{b}": 29.5, f"{c},{d}": 10.0}}
    path.write_text(json.dumps(data))
    table = latency_table(m, ms, key, tmp_path / "cache.json", given=path)
    assert table.T[(a, b)] == pytest.approx((b - a) * 1.25 - 0.5) and table.overhead_ms == 0
    assert table.T[(c, d)] == 0.0 and table.clamped == ((c, d),)
    # what each saved round by round, where the table has it, rather than the medians'
    data["in_model_saved_ms"] = {f"{a},{b}": 0.75, f"{c},{d}": 0.25}
    path.write_text(json.dumps(data))
    table = latency_table(m, ms, key, tmp_path / "cache.json", given=path)
    assert table.T[(a, b)] == pytest.approx((b - a) * 1.25 - 0.75)
    assert table.T[(c, d)] == pytest.approx((d - c) * 1.25 - 0.25) and not table.clamped
    del singles[f"{c},{c + 1}"]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=rf"t.json: in_model_ms \d+,\d+ is priced from the "
                       rf"one-conv entries, and ms has none for \({c}, {c + 1}\)"):
        load_table(path, key)
    path.write_text(json.dumps({**data, "ms": {"0-1": 1.0}}))
    with pytest.raises(UserError, match=r"t.json: entry '0-1' is not named \"i,j\""):
        load_table(path, key)


def test_an_option_is_timed_as_the_layer_merge_makes_with_its_drops(resnet):
    """With layer dropping, T(i, j, option) times the segment with the option's convs
    dropped: (0, 4) keeping one conv of four is a 3x3 conv, the two residual adds folded."""
    m, _ = resnet
    ms = build_space(m, drop_layers=True)
    for option, kernel in [("k3s1d", (3, 3)), ("k7s1d", (7, 7))]:
        sub = segment_net(m, ms, 0, 4, HW, option)
        (name, layer), = sub.named_layers()
        assert name == ms.keep[(0, 4, option)][0]
        assert layer.kernel.value.shape[:2] == kernel
    assert "layer1.0.conv1" in m.layers   # the model itself is left as it was


def test_an_ecdc_table_is_refused_for_a_dropping_space(resnet, tmp_path):
    m, ms = resnet
    lm = build_space(m, drop_layers=True)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_table(table_key(ms, HW, 2), ms)))
    with pytest.raises(UserError, match="drop_layers is False, here True"):
        load_table(path, table_key(lm, HW, 2))
    # an ECDC table written before the field existed still reads as ECDC's
    data = _table(table_key(ms, HW, 2), ms)
    del data["key"]["drop_layers"]
    path.write_text(json.dumps(data))
    assert load_table(path, table_key(ms, HW, 2)) == {s: 1.0 for s in ms.segments}
    lm_data = {"schema": TABLE_SCHEMA, "key": table_key(lm, HW, 2).as_dict(),
               "ms": {f"{i},{j},{o}": 2.0 for i, j, o in lm.entries()}}
    path.write_text(json.dumps(lm_data))
    assert load_table(path, table_key(lm, HW, 2)) == {e: 2.0 for e in lm.entries()}
