"""Bring your own network: any PyTorch classifier imported through its graph.

Each model below is built by its torch factory on random weights and random
BatchNorm statistics (`torch_ref.ready`), imported with `converters.from_torch`
(no builder knows them, so it traces them; timm's EfficientNet-Lite0, which has a
builder, through `converters.trace`), and then:
parity with torch at its native and an odd size, its activation sites (every
activation module call, in forward order), one EASIER round on the digits data,
and merge + export: the fused model, exported, computes what the linearized one
computes, in torch (`model.pt2`) and back in jaxprune (`from_torch(folder)`).
Tolerance: 1e-4 of the logits' scale.
"""
import functools
import json
import zipfile

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import converters
import jaxprune
import models
from jaxprune import config, runner
from jaxprune.errors import UserError
from jaxprune.methods.easier.method import EntropyHooks
from jaxprune.methods.easier.selection import select_sites
from jaxprune.train import Data, Trainer, make_mesh
from models.layers import GATES, Act
from tests import torch_ref
from tests.torch_ref import OwnNet, images, ready, timm, torchvision

TOL = 1e-4
NUM_CLASSES = 10  # the digits data's classes: the EASIER round trains on them


def _tv(name):
    return lambda: getattr(torchvision().models, name)(num_classes=NUM_CLASSES)


# name: (torch factory, native size, odd size: parity, the EASIER round, merge and export,
# activation calls that are not modules: (site, index in forward order))
MODELS = {
    "own": (lambda: OwnNet(NUM_CLASSES), 64, 37, [("se.sigmoid", 2)]),
    "resnet34": (_tv("resnet34"), 224, 33, []),
    "resnet50": (_tv("resnet50"), 224, 33, []),
    "mobilenet_v3_large": (_tv("mobilenet_v3_large"), 224, 33, []),
    "efficientnet_b0": (_tv("efficientnet_b0"), 224, 33, []),
    "regnet_x_400mf": (_tv("regnet_x_400mf"), 224, 33, []),
    "convnext_tiny": (_tv("convnext_tiny"), 224, 33, []),
    "densenet121": (_tv("densenet121"), 224, 33, [("relu", -1)]),  # F.relu before the head
    "timm_efficientnet_lite0": (
        lambda: timm().create_model("efficientnet_lite0", num_classes=NUM_CLASSES), 224, 33, []),
}
# The hand-written model runs in seconds; the torchvision and timm ones take 20 s or more each.
PARAMS = [pytest.param(n, marks=[] if n == "own" else [pytest.mark.slow]) for n in MODELS]


class Imported:
    """A torch model and its import, with one compiled forward pass per input size."""

    def __init__(self, name: str):
        factory, native, _, _ = MODELS[name]
        self.torch = ready(factory(), seed=len(name), calib_size=native)
        if name.startswith("timm_") or name == "resnet34":  # a registered builder claims
            # it (efficientnet_lite0, resnet34): trace it explicitly
            self.jax = converters.trace(self.torch, (native, native))
        else:
            self.jax = converters.from_torch(self.torch)
        self.jax.eval()
        graphdef, _ = nnx.split(self.jax)
        # masks are state: every linearized copy of the model runs this same program
        self._fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))

    def logits(self, m, x) -> np.ndarray:
        return np.asarray(self._fn(nnx.state(m), x))


@pytest.fixture(scope="module")
def imported():
    return functools.cache(Imported)


def jit_logits(m, x) -> np.ndarray:
    """Eval-mode logits of `m`, compiled (op by op, a large model would compile every op)."""
    m.eval()
    graphdef, state = nnx.split(m)
    return np.asarray(jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, x))


def torch_logits(module, x) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def assert_close(got, ref):
    assert got.shape == ref.shape
    scale = float(np.abs(ref).max())
    assert float(np.abs(got - ref).max()) <= TOL * scale, (float(np.abs(got - ref).max()), scale)


def activation_calls(module, size: int) -> list[str]:
    """Every call of an activation module, in forward order, named as sites are: the module
    path, numbered when the module runs more than once."""
    kinds = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.GELU, torch.nn.SiLU, torch.nn.Hardswish,
             torch.nn.Hardsigmoid, torch.nn.Sigmoid)
    calls, hooks = [], []
    for path, mod in module.named_modules():
        if isinstance(mod, kinds):
            hooks.append(mod.register_forward_hook(lambda *_, p=path: calls.append(p)))
    torch_logits(module, images(1, size))
    for h in hooks:
        h.remove()
    count, seen = {p: calls.count(p) for p in calls}, {}
    out = []
    for p in calls:
        seen[p] = seen.get(p, 0) + 1
        out.append(p if count[p] == 1 else f"{p}{seen[p]}")
    return out


# -- the proof, model by model ------------------------------------------------------------------

@pytest.mark.parametrize("name", PARAMS)
def test_parity_at_native_and_odd_size(imported, name):
    _, native, odd, _ = MODELS[name]
    imp = imported(name)
    assert imp.jax.spec.arch.startswith("torch:")  # traced, not a registered builder
    for size, n in ((native, 1), (odd, 2)):
        x = images(n, size, seed=size)
        ref = torch_logits(imp.torch, x)
        assert_close(imp.logits(imp.jax, x), ref)
    # and back to torch: the module to_torch makes computes the original
    assert_close(torch_logits(converters.to_torch(imp.jax), x), ref)


@pytest.mark.parametrize("name", PARAMS)
def test_sites_are_every_activation_call_in_forward_order(imported, name):
    *_, functional = MODELS[name]
    imp = imported(name)
    expected = activation_calls(imp.torch, MODELS[name][2])
    for site, index in functional:
        expected.insert(index if index >= 0 else len(expected) + 1 + index, site)
    assert imp.jax.sites() == expected
    gates = [s for s in expected if imp.jax.layers[s].kind in GATES]
    assert all(imp.jax.layers[s].linear_kind() is None for s in gates)


@pytest.mark.parametrize("name", [p for p in PARAMS if p.values[0] != "own"])
def test_one_easier_round_on_digits(imported, name):
    """One training step of EASIER's round on the digits data: every site's ON/OFF entropy
    is measured, the lowest is linearized, and the weights moved. (The hand-written model
    runs whole EASIER rounds from its config: `test_torch_name_config_runs_easier_...`.)"""
    size = MODELS[name][2]
    m = nnx.clone(imported(name).jax)
    cfg = config.load(None, [f"data.image_size={size}", "data.batch_size=2", "train.lr=0.01"])
    mesh = make_mesh()
    data = Data(cfg, mesh)
    trainer = Trainer(m, cfg.train, steps_per_epoch=1, mesh=mesh, hooks=EntropyHooks())
    trainer.start_round()
    before = np.asarray(m.layers[m.graph[0][0]].kernel.value).copy()
    trainer.train_step(next(data.train_batches(0)[1]))
    record = trainer.finish_epoch()
    trainer.sync_model()
    assert np.isfinite(record["loss"]) and record["examples"] == 2
    entropy = record["sites"]
    assert list(entropy) == m.sites()
    assert all(0.0 <= h <= 1.0 for h in entropy.values())
    new = select_sites(entropy, [])
    assert new and entropy[new[0]] == min(entropy.values())
    jaxprune.linearize(m, new)
    assert jaxprune.linearized(m) == new
    assert not np.array_equal(np.asarray(m.layers[m.graph[0][0]].kernel.value), before)


@pytest.mark.parametrize("name", PARAMS)
def test_merge_is_exact_and_export_gives_it_back(imported, name, tmp_path):
    """Every third site but the gates linearized (an identity gate scales by an unbounded
    factor: logits overflow), fused at the odd size, exported: the exported `model.pt2`
    (torch) and the folder read back (jaxprune) compute the linearized model.

    Linearizing moves what reaches every later BatchNorm: the linearized model gets its
    statistics measured again (`torch_ref.calibrate`), or its logits grow to where float32
    rounding of any order of operations (fused or not) shows at 1e-4."""
    odd = MODELS[name][2]
    imp = imported(name)
    sites = [s for s in imp.jax.sites() if imp.jax.layers[s].kind not in GATES]
    lin = jaxprune.linearize(nnx.clone(imp.jax), sites[1::3])
    calibrated = torch_ref.calibrate(converters.to_torch(lin), seed=1, size=odd)
    converters.load_state(lin, {k: v.numpy() for k, v in calibrated.state_dict().items()})
    small, rep = jaxprune.merge(lin, input_size=(odd, odd), cost="none", verify=False,
                                return_report=True)
    assert rep.after.depth < rep.before.depth
    path = converters.export(small, tmp_path / "export")
    x = images(2, odd, seed=7)
    ref = imp.logits(lin, x)
    back = converters.from_torch(path)
    assert [n for n, _ in back.graph] == [n for n, _ in small.graph]
    assert_close(jit_logits(back, x), ref)
    from converters.torch_program import load_program
    assert_close(torch_logits(load_program(path / "model.pt2").module(), x), ref)


# -- the built-in models are what tracing their torch originals gives --------------------------

def test_traced_resnet18_is_the_builtin_resnet18():
    tm = torch_ref.randomize(torchvision().models.resnet18(num_classes=NUM_CLASSES), 3)
    builtin, traced = converters.from_torch(tm), converters.trace(tm, (64, 64))
    assert builtin.spec.arch == "resnet18" and traced.spec.arch.startswith("torch:")
    assert traced.sites() == builtin.sites() and traced.sites()[:3] == [
        "relu", "layer1.0.relu1", "layer1.0.relu2"]
    assert traced.graph == builtin.graph
    for (_, a), (_, b) in zip(traced.named_layers(), builtin.named_layers()):
        assert type(a) is type(b) and a.config() == b.config()
    x = images(2, 64)
    assert_close(jit_logits(traced, x), jit_logits(builtin, x))


# -- configs: torch:<module>:<factory> and model.source -----------------------------------------

def test_torch_name_config_runs_easier_end_to_end(tmp_path):
    overrides = ["model.name=torch:tests.torch_ref:OwnNet", "model.options={}",
                 "data.image_size=16", "data.batch_size=128", "train.epochs=1",
                 "method.max_rounds=1", "method.acc_budget=100", "method.latency=false",
                 "method.merge_cost=none", f"out={tmp_path}"]
    cfg = config.load("configs/demo.yaml", overrides)
    plan = runner.plan(cfg)
    assert "model:  torch:tests.torch_ref:OwnNet" in plan and "sites:  7" in plan
    run_dir, results = runner.run(cfg)
    assert results["model"] == "torch:tests.torch_ref:OwnNet"
    assert [r["n_linear"] for r in results["rounds"]] == [0, 1]
    assert results["sites"][0] == "relu1" and len(results["sites"]) == 7
    assert results["merge"]["max_abs_diff"] < 1e-3 and results["export"]["max_abs_diff"] < 1e-3
    arch = json.loads((run_dir / "export" / "arch.json").read_text())
    assert arch["arch"] == "torch:tests.torch_ref:OwnNet"
    assert converters.from_torch(run_dir / "export").sites()  # the folder rebuilds the model


def test_model_source_reads_a_saved_program(imported, tmp_path):
    """`model.source`: a `torch.export` program file, imported at the run's image size."""
    imp = imported("own")
    program = torch.export.export(imp.torch, (torch.randn(1, 3, 64, 64),))
    torch.export.save(program, tmp_path / "own.pt2")
    cfg = config.load(None, [f"model.source={tmp_path / 'own.pt2'}"])
    assert cfg.model.name == f"torch:{tmp_path / 'own.pt2'}"
    from jaxprune.context import build_model
    m = build_model(cfg, NUM_CLASSES, (37, 37))
    assert m.sites() == imp.jax.sites() and m.spec.input_size == (37, 37)
    x = images(2, 37)
    assert_close(jit_logits(m, x), torch_logits(imp.torch, x))
    with pytest.raises(UserError, match="both name a model"):
        config.load(None, [f"model.source={tmp_path / 'own.pt2'}", "model.name=resnet18"])
    with pytest.raises(UserError, match="classes, the task 3"):
        build_model(cfg, 3, (37, 37))


def test_pretrained_weights_for_a_torch_model(tmp_path, monkeypatch):
    """`model.pretrained` as for built-in models: a file of the module's state dict loads,
    a classifier of another class count stays fresh; `torchvision:` weights are the ones of
    the torchvision factory named."""
    from jaxprune.context import build_model
    source = ready(OwnNet(NUM_CLASSES), seed=4, calib_size=32)
    torch.save(source.state_dict(), tmp_path / "own.pth")
    name = ["model.name=torch:tests.torch_ref:OwnNet", f"model.pretrained={tmp_path / 'own.pth'}"]
    m = build_model(config.load(None, name), NUM_CLASSES, (37, 37))
    x = images(2, 37)
    assert_close(jit_logits(m, x), torch_logits(source, x))
    three = build_model(config.load(None, name), 3, (37, 37))
    assert three.layers["fc"].kernel.value.shape == (96, 3)
    assert np.array_equal(np.asarray(three.layers["conv1"].kernel.value),
                          source.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))

    import urllib.error

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")
    torchvision()
    import torchvision.models._api as api
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    from converters.pretrained import torchvision_state
    with pytest.raises(UserError, match=r"could not download torchvision:IMAGENET1K_V2 .*"
                                         r"resnet50-\w+\.pth"):
        torchvision_state("IMAGENET1K_V2", "torch:torchvision.models:resnet50")


def test_parity_check_of_an_export_reads_its_program_without_torch_load(imported, tmp_path,
                                                                        monkeypatch):
    """`method: parity` on an export folder compares it with its own `model.pt2`, read by
    `load_program` (torch.export.load would unpickle what the file holds)."""
    from converters.check import max_abs_diff, torch_pair
    converters.export(imported("own").jax, tmp_path / "own")
    monkeypatch.setattr(torch.export, "load", None)  # never called
    program, back = torch_pair("own", {}, None, str(tmp_path / "own"))
    x = images(2, 224)
    assert max_abs_diff(program, back, x) <= TOL * float(np.abs(torch_logits(program, x)).max())


def test_torch_names_that_cannot_build():
    from converters.torch_factory import build, factory
    with pytest.raises(UserError, match="torch:<module>:<factory>"):
        factory("torch:torchvision.models")
    with pytest.raises(UserError, match="standard library"):
        factory("torch:os:system")
    with pytest.raises(UserError, match="cannot import no_such_package"):
        factory("torch:no_such_package.nets:Net")
    with pytest.raises(UserError, match="has no 'resnet5'"):
        factory("torch:torchvision.models:resnet5")
    with pytest.raises(UserError, match="check model.options"):
        build("torch:tests.torch_ref:OwnNet", options={"width": 3}, input_size=(32, 32))
    # a traced model has no builder: what needs one (DepthShrinker's blocks) says so
    with pytest.raises(UserError, match="imported through its graph .* not a registered"):
        models.blocks(build("torch:tests.torch_ref:OwnNet", input_size=(32, 32)))


# -- refusals -----------------------------------------------------------------------------------

def test_unsupported_op_is_refused_in_one_line_naming_op_node_module_and_what_works(tmp_path):
    with pytest.raises(UserError) as e:
        converters.from_torch(torch_ref.Upsampler())
    text = str(e.value)
    assert "\n" not in text
    assert ("cannot import Upsampler: aten.upsample_nearest2d at graph node "
            "'upsample_nearest2d' (module 'up', Upsample) is not supported") in text
    assert "jaxprune maps these ATen ops: " in text and "conv2d" in text and "cat" in text
    # refused before any training: the run stops before its folder holds anything
    cfg = config.load(None, ["model.name=torch:tests.torch_ref:Upsampler",
                             "data.image_size=16", f"out={tmp_path}"])
    with pytest.raises(UserError, match="upsample_nearest2d"):
        runner.run(cfg)
    assert not any(tmp_path.iterdir())


class _Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x)).mean((2, 3))


class _Clamp(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.hardtanh(x, -1.0, 1.0).mean((2, 3))


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        return x.mean((2, 3)) if x.sum() > 0 else -x.mean((2, 3))


@pytest.mark.parametrize("module,match", [
    (_Shared(), "module 'conv' runs more than once with its own parameters"),
    (_Clamp(), r"aten.hardtanh at graph node 'hardtanh' \(in _Clamp.forward\) clamps to "
               r"\[-1.0, 1.0\]; jaxprune maps hardtanh\(0, 6\), i.e. ReLU6"),
    (_DataDependent(), "torch.export could not trace it on a 32x32 image"),
])
def test_what_cannot_be_mapped_is_refused(module, match):
    with pytest.raises(UserError, match=match):
        converters.trace(module, (32, 32))


class _Pools(torch.nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.conv, self.pool = torch.nn.Conv2d(3, 4, 3), pool

    def forward(self, x):  # (N, 4, 3, 3) flattened: 36 logits
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.pool(self.conv(x)), 3), 1)


@pytest.mark.parametrize("pool", [torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False),
                                  torch.nn.AvgPool2d(3, 2, 1), torch.nn.MaxPool2d(2)],
                         ids=["avg_without_pad", "avg", "max"])
def test_pools_match_torch_at_the_borders(pool):
    module = _Pools(pool).eval()
    m = converters.trace(module, (15, 15))
    x = images(2, 15)
    assert_close(jit_logits(m, x), torch_logits(module, x))


def test_gates_are_merge_barriers_but_still_sites(imported):
    m = imported("own").jax
    lin = jaxprune.linearize(nnx.clone(m), ["se.act", "se.sigmoid", "gate.2"])
    small = jaxprune.merge(lin, input_size=(37, 37), cost="none")
    assert isinstance(small.layers["se.sigmoid"], Act) and "gate.2" in small.sites()
    assert "se.act" not in small.layers  # a linearized plain site is fused away
    x = images(2, 37)
    assert_close(jit_logits(small, x), imported("own").logits(lin, x))


# -- a saved program is read without running anything it holds ----------------------------------

@pytest.fixture(scope="module")
def saved_program(imported, tmp_path_factory):
    path = tmp_path_factory.mktemp("program") / "own.pt2"
    program = torch.export.export(imported("own").torch, (torch.randn(2, 3, 32, 32),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, path)
    return path


def _edited(path, out, edit):
    """A copy of the .pt2 archive at `path` with `edit(name, data) -> data | None` applied
    to every entry (None drops it); `edit(None, None)` may return extra entries."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = edit(info.filename, src.read(info))
            if data is not None:
                dst.writestr(info, data)
        for name, data in (edit(None, None) or {}).items():
            dst.writestr(name, data)
    return out


def test_saved_program_round_trips_and_runs(saved_program, imported):
    from converters.torch_program import load_program
    program = load_program(saved_program)
    x = images(3, 32)
    assert_close(torch_logits(program.module(), x), torch_logits(imported("own").torch, x))


@pytest.mark.parametrize("what,edit,match", [
    ("pickled weight", lambda n, d: d.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
     if n and n.endswith("weights_config.json") else None if n is None else d,
     "stored as a Python object"),
    ("native code", lambda n, d: {"own/data/aotinductor/model/model.so": b"\x7fELF"} if n is None
     else d, "AOTInductor native code"),
    ("evaluated text", lambda n, d: d.replace(b"Symbol('s", b"__import__('os').system('touch "
                                                           b"HACKED') or Symbol('s", 1)
     if n and n.endswith("models/model.json") else None if n is None else d,
     "a shape expression names '__import__'"),
])
def test_saved_program_with_code_in_it_is_refused_unread(saved_program, tmp_path, what, edit,
                                                         match, monkeypatch):
    from converters.torch_program import load_program
    monkeypatch.chdir(tmp_path)
    bad = _edited(saved_program, tmp_path / "bad.pt2", edit)
    with pytest.raises(UserError, match=match):
        load_program(bad)
    assert not (tmp_path / "HACKED").exists()
