"""The measuring module: fresh processes per runtime (torch never beside JAX), the order of
plainly different workloads, and every latency figure of a report taken from it."""
import numpy as np
import pytest

import models
from jaxprune import measure
from jaxprune.measure import Timing, Timings, Workload
from jaxprune.errors import UserError

LAYERS = "jaxprune.measure.workloads:jax_layers"


def _conv(k: int) -> Workload:
    config = {"cin": 128, "cout": 128, "kernel": [k, k], "stride": [1, 1],
              "padding": [[k // 2, k // 2]] * 2, "groups": 1, "bias": False}
    return Workload(f"conv{k}x{k}", "jax", LAYERS, {"batch": 8, "kind": "Conv", "config": config,
                                                   "input_shapes": [[14, 14, 128]]})


def test_orders_two_plainly_different_workloads_and_times_torch_without_jax():
    """A 7x7 conv at 128 channels (49x the MACs) is slower than a 1x1, and a call of an
    exported identity program (torch's per-call overhead) is faster than a ResNet's; the
    torch processes never imported JAX, the JAX processes never imported torch; each
    workload has a median per burst of each round."""
    torch_side = Workload("resnet torch", "torch", "jaxprune.measure.workloads:torch_original",
                          {"arch": "resnet18_cifar", "options": {"width": 4}, "num_classes": 10,
                           "batch": 1, "input_size": [16, 16]})
    overhead = measure.call_overhead("torch")
    t = measure.measure([_conv(1), _conv(7), torch_side, overhead], rounds=2, bursts=2,
                        warmup=1, repeats=3)
    assert t.ratio("conv7x7", "conv1x1") > 3
    assert 0 < t["call overhead torch"].median_ms < t["resnet torch"].median_ms
    assert t["resnet torch"].imported == t["call overhead torch"].imported == {
        "jax": False, "torch": True}
    assert t["conv1x1"].imported == {"jax": True, "torch": False}
    for timing in t.timings.values():
        assert len(timing.burst_medians_ms) == 4 and timing.repeats == 3  # 2 rounds x 2
        assert timing.spread_ms[0] <= timing.median_ms <= timing.spread_ms[1]
        assert timing.threads >= 1


def test_saved_spec_reruns(tmp_path):
    spec = tmp_path / "spec.json"
    t = measure.measure([_conv(1)], rounds=1, warmup=0, repeats=1, save=spec)
    assert t.command == f"python -m jaxprune.measure {spec}"
    workloads, settings = measure.load_spec(spec)
    assert workloads == [_conv(1)] and settings["rounds"] == 1


def test_paired_speedups_are_burst_by_burst():
    """A machine that slows down by half between bursts moves both sides of a ratio: the
    ratio of medians blurs it, the ratio burst by burst does not."""
    def timing(name, bursts):
        return Timing(name, "torch", float(np.median(bursts)), (min(bursts), max(bursts)),
                      bursts, 20, 1, "cpu", {})
    t = Timings({"dense": timing("dense", [10.0, 15.0, 10.0, 15.0, 15.0]),
                 "fused": timing("fused", [5.0, 7.5, 5.0, 7.5, 5.0])}, 1, True, None, 5)
    assert t.paired("dense", "fused") == [2.0, 2.0, 2.0, 2.0, 3.0]
    assert t.ratio("dense", "fused") == 15.0 / 5.0
    # what fused saves, burst by burst: 5, 7.5, 5, 7.5, 10 ms, median 7.5; the difference
    # of the medians (15 - 5 = 10) takes each side from another burst
    assert t.paired_saving_ms("dense", "fused") == 7.5
    short = Timings({"dense": t["dense"], "fused": timing("fused", [5.0])}, 1, True, None, 1)
    with pytest.raises(ValueError):  # bursts of different measurements are not pairs
        short.paired("dense", "fused")
    with pytest.raises(ValueError):
        short.paired_saving_ms("dense", "fused")


def test_bad_workloads_are_refused():
    with pytest.raises(UserError, match="runtime must be one of"):
        Workload("x", "tensorflow", LAYERS, {})
    with pytest.raises(UserError, match="names must be unique"):
        measure.measure([_conv(1), _conv(1)])
    broken = Workload("broken", "jax", LAYERS, {"batch": 1, "kind": "NoSuchKind", "config": {},
                                                "input_shapes": [[4, 4, 3]]})
    with pytest.raises(UserError, match=r"timing broken \(jax\) failed: .*NoSuchKind"):
        # the conv's worker is built and waiting when the broken one fails: it is ended too
        measure.measure([_conv(1), broken], rounds=1, warmup=0, repeats=1)


def _fake_timings(names, base=10.0):
    timings = {n: Timing(n, n.split()[-1], base + i, (base + i - 1, base + i + 1),
                         [base + i], 20, 2, "cpu", {})
               for i, n in enumerate(names)}
    return Timings(timings, 3, True, "python -m jaxprune.measure /x/spec.json")


def test_every_latency_figure_comes_from_the_module(monkeypatch, tmp_path):
    """The report's latency rows, `profile(latency=...)` and merge's latency cost model all
    read what `jaxprune.measure` measured: with the module replaced by a fake, its numbers
    are what they show."""
    from jaxprune import profile
    from jaxprune.context import RunContext
    from jaxprune.config import from_dict
    from jaxprune.measure import models as measure_models
    from jaxprune.methods import fuse_export
    seen = {}

    def fake_latency(named, hw, **kw):
        seen.update(kw)
        return _fake_timings([f"{n} {r}" for n in named for r in kw.get("runtimes", ("jax", "torch"))])
    monkeypatch.setattr(measure_models, "model_latency", fake_latency)
    m = models.create("resnet18_cifar", num_classes=10, width=4)
    ctx = RunContext(from_dict({"method": {"name": "easier"}}), tmp_path, 10)
    monkeypatch.setattr(RunContext, "image_size", (16, 16))
    table = fuse_export.latency_table(ctx, m, m, tmp_path / "export")
    assert seen["programs"] == {"fused": tmp_path / "export"}
    assert table["runtimes"]["jax"]["dense_ms"] == 10.0 and table["runtimes"]["jax"]["fused_ms"] == 12.0
    assert table["runtimes"]["torch"]["dense_ms"] == 11.0 and table["runtimes"]["torch"]["fused_ms"] == 13.0
    blocks = fuse_export.latency_blocks(table, "dense")
    rows = [r[1:] for r in blocks[0].rows]
    assert rows == [["10.000", "9.000 – 11.000", "12.000", "11.000 – 13.000", "**0.83x**",
                     "0.83x (0.83x – 0.83x)"],
                    ["11.000", "10.000 – 12.000", "13.000", "12.000 – 14.000", "**0.85x**",
                     "0.85x (0.85x – 0.85x)"]]
    assert "python -m jaxprune.measure /x/spec.json" in blocks[1]

    p = profile(m, (16, 16), latency=["jax", "torch"], batch=4)
    assert p.latency_ms == {"jax@4": 10.0, "torch@4": 11.0}
    assert p.latency_spread_ms == {"jax@4": (9.0, 11.0), "torch@4": (10.0, 12.0)}

    calls = []

    def fake_measure(workloads, **kw):
        calls.append((workloads, kw))
        return _fake_timings([w.name for w in workloads], base=1.0)
    monkeypatch.setattr(measure, "measure", fake_measure)
    import jaxprune
    jaxprune.linearize(m, ["layer1.0.relu1"])
    small, rep = jaxprune.merge(m, input_size=(16, 16), cost="latency", return_report=True)
    (workloads, kw), = calls  # every candidate timed in one call, in one JAX process
    assert kw["separate"] is False and all(w.runtime == "jax" for w in workloads)
    assert rep.max_abs_diff < 1e-4


@pytest.mark.slow
def test_a_real_latency_table_of_a_fused_model(tmp_path):
    """fuse_and_export with latency on: dense torchvision-style original against the fused
    export, both runtimes, real processes, at the batch asked for; the saved spec reruns
    it."""
    import jaxprune
    from jaxprune.activation_sites import dense_copy
    from jaxprune.config import from_dict
    from jaxprune.context import RunContext
    from jaxprune.methods.fuse_export import fuse_and_export
    cfg = from_dict({"model": {"options": {"width": 4}}, "data": {"image_size": 16},
                     "method": {"name": "easier"}})
    ctx = RunContext(cfg, tmp_path, 10)
    m = models.create("resnet18_cifar", num_classes=10, width=4)
    jaxprune.linearize(m, [s for s in m.sites() if s.endswith("relu1")])
    out, small = fuse_and_export(ctx, m, dense_copy(m), cost="none", batch=2)
    lat = out["latency"]
    assert set(lat["runtimes"]) == {"jax", "torch"} and lat["batch"] == 2
    for r in lat["runtimes"].values():
        assert r["dense_ms"] > 0 and r["fused_ms"] > 0
        assert np.isclose(r["speedup"], r["dense_ms"] / r["fused_ms"])
    assert lat["command"] == f"python -m jaxprune.measure {tmp_path / 'latency' / 'spec.json'}"
    # the fused 5x5 blocks carry border terms: the fused model is also timed without them
    assert small.layers and any(getattr(layer, "border", None) for layer in small.layers.values())
    for r in lat["runtimes"].values():
        assert r["bare_ms"] > 0 and np.isclose(r["border_ms"], r["fused_ms"] - r["bare_ms"])
    workloads, _ = measure.load_spec(tmp_path / "latency" / "spec.json")
    assert [w.factory.split(":")[1] for w in workloads] == [
        "jax_model", "torch_original", "jax_model", "torch_program", "jax_model", "torch_program"]
    assert [w.name for w in workloads][4:] == ["bare jax", "bare torch"]
    assert {w.args["batch"] for w in workloads} == {2}
