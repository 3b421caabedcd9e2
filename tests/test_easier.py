"""EASIER: the entropy against the reference formula, the selection and stopping
rules, checkpoints, and the demo config end to end."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

import jaxprune
import models
from jaxprune import config, runner
from jaxprune.methods.easier import EasierConfig
from jaxprune.methods.easier.selection import select_round, select_sites, stop_reason
from jaxprune.train.checkpoint import Checkpoints
from models.net import INPUT


def _preactivations(m, x) -> dict[str, np.ndarray]:
    """The input of every site for batch `x` in train mode, from a walk over the graph
    of a copy of `m` (so `m` keeps its running statistics); jitted only for speed."""
    walk = nnx.clone(m)
    walk.train()
    graphdef, state = nnx.split(walk)

    @jax.jit
    def run(state, x):
        net = nnx.merge(graphdef, state)
        env, out = {INPUT: x}, {}
        for name, inputs in net.graph:
            args = [env[i] for i in inputs]
            if name in net.sites():
                out[name] = args[0]
            env[name] = net.layers[name](*args)
        return out

    return jax.tree.map(np.asarray, run(state, x))


def _reference_entropy(z: np.ndarray) -> float:
    """The reference implementation's formula, step by step, on one site's input
    (batch first, features last): ON/OFF probabilities per position over the batch,
    averaged over the remaining positions, clamped log2, mean over units."""
    n = z.shape[0]
    plus = (z >= 0).sum(axis=0) / n
    minus = (z < 0).sum(axis=0) / n
    while plus.ndim > 1:  # spatial positions (conv) or tokens (Swin), one axis at a time
        plus, minus = plus.mean(axis=0), minus.mean(axis=0)
    h = (-plus * np.log2(np.maximum(plus, 1e-10))
         - minus * np.log2(np.maximum(minus, 1e-10)))
    return float(h.mean())


def _check_against_reference(m, x, kinds):
    """site_entropy equals the reference on every site; `kinds` maps a site to the
    layout its input must have (so the test covers what it claims to)."""
    z = _preactivations(m, x)
    got = jaxprune.site_entropy(m, x)
    assert list(got) == m.sites()
    for site, ndim in kinds.items():
        assert z[site].ndim == ndim, (site, z[site].shape)
    for site, values in z.items():
        assert got[site] == pytest.approx(_reference_entropy(values), abs=1e-5), site
    return got


def _images(n, size, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def test_entropy_conv_sites_match_reference():
    m = models.create("resnet18_cifar", num_classes=10, width=4)
    got = _check_against_reference(m, _images(6, 16), {"relu": 4, "layer4.1.relu2": 4})
    assert all(0.0 <= h <= 1.0 for h in got.values())


def test_site_entropy_leaves_model_unchanged():
    m = models.create("resnet18_cifar", num_classes=10, width=4)
    m.eval()
    before = jax.tree.map(np.asarray, nnx.state(m))
    jaxprune.site_entropy(m, _images(4, 16))
    after = jax.tree.map(np.asarray, nnx.state(m))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
    assert m.layers["bn1"].use_running_average  # still in eval mode
    assert not any(m.layers[s].record for s in m.sites())


def test_entropy_of_a_linear_site_is_still_measured():
    """A linearized site's input is still a pre-activation: its entropy is reported
    (the heat map shows it), only the selection skips it."""
    m = models.create("resnet18_cifar", num_classes=10, width=4)
    jaxprune.linearize(m, ["layer2.0.relu1"])
    _check_against_reference(m, _images(4, 16, seed=1), {"layer2.0.relu1": 4})


@pytest.mark.slow
def test_entropy_linear_sites_match_reference():
    """VGG-16-BN's classifier ReLUs see (batch, units) inputs."""
    m = models.create("vgg16_bn", num_classes=10, dropout=0.0)
    _check_against_reference(m, _images(4, 32), {"classifier.1": 2, "classifier.4": 2,
                                                 "features.2": 4})


@pytest.mark.slow
def test_entropy_token_sites_match_reference():
    """Swin-T's MLP GELUs see token maps: per hidden unit, averaged over tokens."""
    m = models.create("swin_t", num_classes=10, stochastic_depth_prob=0.0)
    sites = m.sites()
    got = _check_against_reference(m, _images(2, 32), {})
    assert len(got) == 12 and sites[0].endswith("mlp.gelu")


# -- the selection rule ----------------------------------------------------------------------

def test_select_lowest_remaining_site():
    h = {"a": 0.9, "b": 0.3, "c": 0.5, "d": 0.1}
    assert select_sites(h, done=[]) == ["d"]
    assert select_sites(h, done=["d"]) == ["b"]


def test_select_adds_sites_with_zero_entropy_and_first_on_ties():
    h = {"a": 0.4, "b": 0.0, "c": 0.2, "d": 0.0, "e": 0.2}
    # b is the minimum; d also has exactly 0 entropy; nothing else does
    assert select_sites(h, done=[]) == ["b", "d"]
    assert select_sites(h, done=["b", "d"]) == ["c"]  # tie at 0.2: forward order
    # an already linear site with entropy 0 is not picked again
    assert select_sites({"a": 0.0, "b": 0.5}, done=["a"]) == ["b"]


def test_select_nothing_when_every_site_is_linear():
    assert select_sites({"a": 0.0, "b": 0.5}, done=["a", "b"]) == []


def _round(r, n, val):
    return {"round": r, "n_linear": n, "n_sites": 4, "val_acc": val}


def test_stop_rules_and_round_selection():
    opts = EasierConfig(max_rounds=None, acc_budget=1.0)
    rounds = [_round(0, 0, 90.0), _round(1, 1, 89.5), _round(2, 2, 89.0)]
    assert stop_reason(rounds, opts) is None
    assert "max_rounds" in stop_reason(rounds, EasierConfig(max_rounds=2))
    broken = rounds + [_round(3, 3, 88.9)]
    assert "budget" in stop_reason(broken, opts)
    assert select_round(broken, 1.0)["round"] == 2  # the deepest round inside the budget
    assert select_round(broken, 5.0)["round"] == 3
    assert "every site" in stop_reason(rounds + [_round(3, 4, 90.0)], opts)
    assert select_round([_round(0, 0, 90.0), _round(1, 1, 80.0)], 1.0)["round"] == 0


def test_bad_method_options_are_user_errors(tmp_path):
    with pytest.raises(jaxprune.UserError, match="method.acc_budget"):
        runner.run(config.load(None, ["method.acc_budget=-1", f"out={tmp_path / 'a'}"]))
    with pytest.raises(jaxprune.UserError, match="method.merge_cost"):
        runner.run(config.load(None, ["method.merge_cost=fast", f"out={tmp_path / 'b'}"]))
    with pytest.raises(jaxprune.UserError, match="method.max_round"):
        config.load(None, ["method.max_round=3"])


# -- checkpoints -----------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    m = models.create("resnet18_cifar", num_classes=10, width=4, seed=0)
    jaxprune.linearize(m, ["layer1.1.relu2"])
    ckpt = Checkpoints(tmp_path / "ck")
    assert ckpt.latest() is None
    ckpt.save(0, m, {"rounds": [{"round": 0}]})
    ckpt.save(1, m, {"rounds": [{"round": 0}, {"round": 1}]})
    assert ckpt.rounds() == [0, 1]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["round_000", "round_001"]
    other = models.create("resnet18_cifar", num_classes=10, width=4, seed=1)
    meta = ckpt.load(1, other)
    assert meta["rounds"][-1]["round"] == 1
    assert jaxprune.linearized(other) == ["layer1.1.relu2"]
    same = jax.tree.map(np.array_equal, jax.tree.map(np.asarray, nnx.state(m, nnx.Param)),
                        jax.tree.map(np.asarray, nnx.state(other, nnx.Param)))
    assert jax.tree.all(same)
    wider = models.create("resnet18_cifar", num_classes=10, width=8)
    with pytest.raises(jaxprune.UserError, match="another model"):
        ckpt.load(1, wider)


def test_incomplete_checkpoint_is_ignored(tmp_path):
    m = models.create("resnet18_cifar", num_classes=10, width=4)
    ckpt = Checkpoints(tmp_path)
    ckpt.save(0, m, {"rounds": []})
    (tmp_path / "round_001.orbax-checkpoint-tmp").mkdir()  # a crash while writing round 1
    (tmp_path / "round_002").mkdir()                        # a folder without its files
    assert ckpt.latest() == 0 and ckpt.rounds() == [0]


# -- end to end ------------------------------------------------------------------------------

# What `jaxprune.measure` reports in the tests below, in place of timing: ms per batch in
# (JAX, torch). The fused model is slower than its unfused self in JAX.
MEASURED = {"dense": (10.0, 11.0), "unfused": (8.0, 9.0), "fused": (9.0, 12.0), "bare": (8.5, 11.5)}


def _fake_model_latency(calls: list):
    """`measure.models.model_latency` answering `MEASURED`, recording what it was asked."""
    from jaxprune.measure import Timing, Timings

    def model_latency(named, hw, **kw):
        calls.append((list(named), kw))
        return Timings({f"{n} {rt}": Timing(f"{n} {rt}", rt, ms, (ms - 1, ms + 1), [ms],
                                            kw["repeats"], 2, "cpu", {})
                        for n in named for rt, ms in zip(("jax", "torch"), MEASURED[n])},
                       kw["rounds"], True, "python -m jaxprune.measure SPEC")
    return model_latency


def _fake_layer_measure(workloads, **kw):
    """`jaxprune.measure.measure` for merge's candidates: 1.5 ms per layer and 100.5 ms
    for a kernel wider than 3 (a composed 3x3 pair), the per-call overhead 0.5 ms, so no
    such layer is ever fused."""
    from jaxprune.measure import Timing, Timings
    out = {}
    for w in workloads:
        if w.factory.endswith("_call_overhead"):
            ms = 0.5
        else:
            config = w.args["config"]
            kernel = config.get("kernel") or config.get("kernel_size") or [1]
            ms = 100.5 if max(kernel) > 3 else 1.5
        out[w.name] = Timing(w.name, w.runtime, ms, (ms, ms), [ms], 5, 2, "cpu", {})
    return Timings(out, 1, False, None)


def test_demo_config_end_to_end(tmp_path, monkeypatch):
    """configs/demo.yaml, shortened (and on the plain digits, a quarter of digits_rot's
    images): every output of DESIGN.md §9, and a second run of the same config resumes
    from the checkpoints instead of training again. Timing is replaced by fixed numbers
    (`MEASURED`, `_fake_layer_measure`): merge's latency cost model keeps every run whose
    fused layer is timed slower and the report says so; the fused model, slower than its
    unfused self, is not what is exported, and the report says so with both numbers."""
    from jaxprune import measure
    from jaxprune.measure import models as measure_models
    from jaxprune.methods.fuse_export import LATENCY_BATCH
    calls = []
    monkeypatch.setattr(measure, "measure", _fake_layer_measure)
    monkeypatch.setattr(measure_models, "model_latency", _fake_model_latency(calls))
    overrides = ["train.epochs=1", "method.max_rounds=2", "method.acc_budget=100",
                 "method.pretrain_epochs=1", "model.options={width: 4}", "data.name=digits",
                 f"out={tmp_path}"]
    cfg = config.load("configs/demo.yaml", overrides)
    assert (cfg.method.merge_cost, cfg.method.latency) == ("latency", True)
    run_dir, results = runner.run(cfg)
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert (on_disk["method"], on_disk["model"], on_disk["dataset"]) == (
        "easier", "resnet18_cifar", "digits")
    assert on_disk["pretrain_epochs"] == 1
    rounds = on_disk["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["n_linear"] for r in rounds] == [0, 1, 2]
    sites = on_disk["sites"]
    for prev, r in zip(rounds, rounds[1:]):
        assert r["new"] == select_sites(prev["entropy"], prev["linearized"])
        assert set(r["linearized"]) == set(prev["linearized"]) | set(r["new"])
    for r in rounds:
        assert list(r["entropy"]) == sites and r["n_sites"] == 17
        for key in ("train_acc", "val_acc", "test_acc"):
            assert 0.0 <= r[key] <= 100.0
    sel = on_disk["selected"]
    assert sel["round"] == 2 and "max_rounds" in sel["stop"]
    merge, export = on_disk["merge"], on_disk["export"]
    assert merge["depth_after"] <= merge["depth_before"] == 18
    assert merge["max_abs_diff"] < 1e-3 and merge["cost_model"] == "latency"
    assert export["max_abs_diff"] < 1e-3 and (run_dir / "export").is_dir()
    for name in ("report.md", "entropy.png", "accuracy.png", "config.yaml"):
        assert (run_dir / name).stat().st_size > 0, name
    report = (run_dir / "report.md").read_text()
    assert "| 2 | 2/17 |" in report and rounds[2]["new"][0] in report
    # per run: no layer timed slower (a composed 5x5) was fused; each run kept says so
    assert not [f for f in merge["fused"] if f["op"].startswith(("conv 5x5", "conv 7x7"))]
    for kept in merge["skipped"]:
        assert f"- kept {kept['run'][0]} .. {kept['run'][1]}: {kept['reason']}" in report
        if "ms" in kept:
            assert kept["ms"]["fused"] == 100.0 and kept["ms"]["chosen"] < 100.0
    # the whole model, timed at the table's batch: what `jaxprune.measure` answered is what
    # results.json and the report say, and the guard's decision is printed as made
    (named, kw), = calls[:1]
    assert named[0] == "dense" and "fused" in named and kw["batch"] == LATENCY_BATCH
    jax_row = on_disk["latency"]["runtimes"]["jax"]
    assert (jax_row["dense_ms"], jax_row["fused_ms"]) == (10.0, 9.0)
    assert "| jax (jit) | 10.000 | 9.000 – 11.000 |" in report
    guard = on_disk["guard"]
    assert f"**Exported: the {guard['exported']} model**: {guard['why']}." in report
    # no run fused beyond BatchNorm folds (the sites picked here, after residual sums,
    # leave none): then the fused model is its unfused self, timed once
    same = guard["why"].startswith("no run was fused")
    assert ("unfused" in named) is not same
    assert not same or (merge["depth_after"], merge["params_after"]) == (
        on_disk["unfused"]["depth"], on_disk["unfused"]["params"])
    log = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the dense pretraining, then one epoch per round
    assert [(r.get("stage"), r.get("round"), r["epoch"]) for r in log] == [
        ("dense", None, 1), (None, 0, 1), (None, 1, 1), (None, 2, 1)]
    assert Checkpoints(run_dir / "checkpoints" / "rounds").rounds() == [0, 1, 2]

    # the selected round's weights are what the run reports on
    m = models.create("resnet18_cifar", num_classes=10, width=4)
    Checkpoints(run_dir / "checkpoints" / "rounds").load(sel["round"], m)
    assert jaxprune.linearized(m) == [s for s in sites if s in sel["linearized"]]

    again_dir, again = runner.run(cfg)
    assert again_dir == run_dir
    assert again["rounds"] == results["rounds"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4  # nothing retrained


def test_guard_exports_the_unfused_model_when_the_fused_one_measures_slower(tmp_path,
                                                                           monkeypatch):
    """fuse_and_export with the guard, `jaxprune.measure` answering `MEASURED` (fused 9 ms,
    unfused 8 ms in JAX): the dense, unfused and fused models are timed together, the
    unfused model (BatchNorms folded, no run fused) is exported and returned, and the
    report gives every row as measured and says why, with both numbers."""
    from jaxprune.activation_sites import dense_copy
    from jaxprune.config import from_dict
    from jaxprune.context import RunContext
    from jaxprune.measure import models as measure_models
    from jaxprune.methods.fuse_export import fuse_and_export, merge_sections
    from jaxprune.report import Report, markdown
    from models.layers import Conv, FusedConv
    calls = []
    monkeypatch.setattr(measure_models, "model_latency", _fake_model_latency(calls))
    cfg = from_dict({"model": {"options": {"width": 4}}, "data": {"image_size": 16},
                     "method": {"name": "easier"}})
    monkeypatch.setattr(RunContext, "image_size", (16, 16))
    ctx = RunContext(cfg, tmp_path, 10)
    m = models.create("resnet18_cifar", num_classes=10, width=4)
    jaxprune.linearize(m, ["layer1.0.relu1", "layer2.1.relu1"])
    out, exported = fuse_and_export(ctx, m, dense_copy(m), cost="none", guard=True, rounds=2)
    (named, kw), = calls
    assert named[:3] == ["dense", "unfused", "fused"] and kw["rounds"] == 2
    assert kw["programs"]["fused"] == tmp_path / "latency" / "fused"
    assert kw["programs"]["unfused"] == tmp_path / "latency" / "unfused"
    assert out["guard"]["exported"] == "unfused"
    assert out["guard"]["why"] == (
        "the fused model measured slower than its unfused self in JAX and torch (JAX: 9.000 "
        "against 8.000 ms; torch: 12.000 against 9.000 ms, per batch of 1): the unfused model "
        "(BatchNorms folded, no run fused) is exported instead")
    assert out["merge"]["depth_after"] == 16 and out["unfused"]["depth"] == 18
    assert not any(isinstance(layer, FusedConv) or isinstance(layer, Conv)
                   and layer.kernel_size == (5, 5) for layer in exported.layers.values())
    assert out["export"]["path"] == str(tmp_path / "export")
    assert ((tmp_path / "export" / "arch.json").read_text()
            == (tmp_path / "latency" / "unfused" / "arch.json").read_text())
    for runtime, k in (("jax", 0), ("torch", 1)):
        row = out["latency"]["runtimes"][runtime]
        assert [row["dense_ms"], row["unfused_ms"], row["fused_ms"]] == [
            MEASURED["dense"][k], MEASURED["unfused"][k], MEASURED["fused"][k]]
    text = markdown(Report("t", merge_sections(out, before="dense")))
    assert ("| jax (jit) | 10.000 | 9.000 – 11.000 | 8.000 | 7.000 – 9.000 | 9.000 | "
            "8.000 – 10.000 | **1.11x** | 1.11x (1.11x – 1.11x) | **0.89x** |") in text
    assert "| torch (eager: dense = torchvision's/timm's own module, unfused and fused = " \
           "model.pt2) | 11.000 | 10.000 – 12.000 | 9.000 | 8.000 – 10.000 | 12.000 |" in text
    assert f"**Exported: the unfused model**: {out['guard']['why']}." in text
    assert "| depth (weight layers) | 18 | 18 | 16 | 0.89 |" in text


def test_guard_exports_the_fused_model_unless_it_measures_slower_in_a_runtime():
    """A fused model slower than its unfused self in JAX or in torch (its model.pt2, what
    the export is) is not exported; equal is not slower."""
    from jaxprune.methods.fuse_export import guard_decision

    def table(fused, unfused, torch_fused=1.0):
        return {"batch": 1, "runtimes": {"jax": {"fused_ms": fused, "unfused_ms": unfused},
                                         "torch": {"fused_ms": torch_fused, "unfused_ms": 9.0}}}
    assert guard_decision(table(1.0, 2.0), same=False)["exported"] == "fused"
    assert guard_decision(table(1.0, 1.0), same=False)["exported"] == "fused"
    slower = guard_decision(table(2.5, 2.0), same=False)
    assert slower["exported"] == "unfused" and slower["slower_in"] == ["jax"]
    assert "in JAX (JAX: 2.500 against 2.000 ms; torch: 1.000 against 9.000 ms" in slower["why"]
    in_torch = guard_decision(table(1.0, 2.0, torch_fused=9.5), same=False)
    assert in_torch["exported"] == "unfused" and in_torch["slower_in"] == ["torch"]
    same = guard_decision({"batch": 1, "runtimes": {"jax": {"fused_ms": 3.0}}}, same=True)
    assert same["exported"] == "fused" and same["why"].startswith("no run was fused")


# -- the paper's configs -----------------------------------------------------------------------

FAMILIES = ("resnet18", "vgg16_bn", "mobilenet_v2", "swin_t")
DATASETS = ("cifar10", "tiny_imagenet", "pacs", "vlcs", "flowers102", "dtd", "aircraft")


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_paper_configs(family, dataset):
    """One config per model x data pair of DESIGN.md §5, with its hyperparameters,
    pretrained start and a header that gives the command and the published result."""
    from pathlib import Path

    from jaxprune import data
    path = Path("configs/easier") / f"{family}_{dataset}.yaml"
    text = path.read_text()
    assert f"python run.py --config {path}" in text and "Published" in text
    cfg = config.load(path)
    assert cfg.method == EasierConfig(max_rounds=None, acc_budget=1.0)
    assert cfg.data.name == dataset and dataset in data.available()
    models.entry(cfg.model.name)  # a registered architecture
    assert cfg.model.name.startswith(family)
    small_data = dataset in ("cifar10", "tiny_imagenet")
    t = cfg.train
    if small_data:
        lr = {"resnet18": 0.1, "mobilenet_v2": 0.1, "vgg16_bn": 0.01, "swin_t": 1e-3}[family]
        assert (t.epochs, cfg.data.batch_size, t.optimizer, t.lr, t.momentum, t.schedule,
                t.milestones, t.gamma, t.weight_decay) == (
            160, 128, "sgd", lr, 0.9, "step", [80, 120], 0.1, 1e-4)
    elif dataset in ("pacs", "vlcs"):
        assert (t.epochs, cfg.data.batch_size, t.optimizer, t.lr, t.momentum, t.schedule,
                t.milestones, t.gamma, t.weight_decay) == (
            30, 16, "sgd", 1e-3, 0.9, "step", [24], 0.1, 5e-4)
    else:
        assert (t.epochs, cfg.data.batch_size, t.optimizer, t.lr, t.schedule,
                t.weight_decay) == (50, 16, "adam", 1e-4, "constant", 0.0)
    imagenet_start = (family in ("vgg16_bn", "swin_t")
                      or dataset in ("flowers102", "dtd", "aircraft")
                      or (family == "mobilenet_v2" and dataset != "cifar10"))
    assert cfg.model.pretrained == ("torchvision:IMAGENET1K_V1" if imagenet_start else None)
    cifar_variant = ((family == "resnet18" and dataset in ("cifar10", "pacs", "vlcs"))
                     or (family == "mobilenet_v2" and dataset == "cifar10"))
    assert cfg.model.name.endswith("_cifar") == cifar_variant
