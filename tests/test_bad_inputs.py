"""Bad inputs on the command line: each is answered by one line `error: ...` on stderr
and exit status 2, no traceback, and writes nothing it should not.

Every test runs `python run.py` in a subprocess from an empty working folder, so a
stray write (to the working folder, next to the inputs, outside `out`) shows up as a
changed file tree. `--dry-run` is used wherever the error is raised while planning.
"""
import dataclasses
import functools
import os
import pickle
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
import yaml

import run as cli
from jaxprune import config as jconfig, methods

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {  # small and fast: a width-8 CIFAR ResNet-18 checked against its torch original
    "name": "parity8",
    "model": {"name": "resnet18_cifar", "num_classes": 10, "options": {"width": 8}},
    "method": {"name": "parity", "sizes": [32]},
}
EASIER = {  # a method that reads data
    "name": "easier8",
    "model": {"name": "resnet18_cifar", "num_classes": 10, "options": {"width": 8}},
    "method": {"name": "easier"},
}


def _run(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # run.py sets its own
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def _error(r) -> str:
    """The one-line error of a refused run, without its 'error: ' prefix."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 \
        and r.stderr.endswith("\n"), r.stderr
    return r.stderr[len("error: "):-1]


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.fixture
def work(tmp_path):
    """(config file, out folder, empty working folder) in a fresh tmp_path."""
    cfg = tmp_path / "parity.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    (tmp_path / "cwd").mkdir()
    return cfg, tmp_path / "runs", tmp_path / "cwd"


# --- the config ------------------------------------------------------------------------------

@pytest.mark.parametrize("override,parts", [
    ("train.epohcs=2", ["unknown config key 'train.epohcs'", "did you mean 'train.epochs'"]),
    ("train.lr=fast", ["config key 'train.lr' must be float", "got 'fast' (str)"]),
], ids=["unknown-key", "wrong-type"])
def test_bad_config_key(tmp_path, work, override, parts):
    cfg, out, cwd = work
    before = _tree(tmp_path)
    msg = _error(_run("--config", cfg, "--out", out, "--set", override, cwd=cwd))
    for part in parts:
        assert part in msg
    assert _tree(tmp_path) == before  # a real run, refused before anything is written


@pytest.mark.parametrize("name", ["../escape", "ABS", ".."])
def test_run_name_cannot_leave_out(tmp_path, work, name):
    cfg, out, cwd = work
    name = str(tmp_path / "abs") if name == "ABS" else name
    before = _tree(tmp_path)
    msg = _error(_run("--config", cfg, "--out", out, "--set", f"name={name}", cwd=cwd))
    assert msg == (f"config key 'name' must be a plain folder name (letters, digits, '-', '_', "
                   f"'.'), got {name!r}: the run folder is <out>/<name>; put folders in 'out'")
    assert _tree(tmp_path) == before  # neither <out>/../escape nor /abs nor anything else


def test_yaml_python_tag_is_not_run(tmp_path, work):
    _, out, cwd = work
    marker = tmp_path / "yaml-payload-ran"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n'
                   "method: {name: parity}\n")
    before = _tree(tmp_path)
    msg = _error(_run("--config", cfg, "--out", out, cwd=cwd))
    assert msg.startswith(f"{cfg} holds a YAML tag that would build a Python object (could "
                          "not determine a constructor for the "
                          "tag 'tag:yaml.org,2002:python/object/apply:os.system'")
    assert msg.endswith("read with yaml.safe_load: remove the tag")
    assert not marker.exists() and _tree(tmp_path) == before


# --- data --------------------------------------------------------------------------------------

def _missing_data(root: Path) -> str:
    return (f"Tiny-ImageNet-200 not found: looked for <split>/<class>/ image folders in "
            f"{root}/tiny-imagenet-200, {root}/tiny_imagenet. Prepare it with: "
            f"python -m jaxprune.data prepare tiny_imagenet --root {root}")


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
def test_missing_data_names_where_it_looked_and_the_prepare_command(tmp_path, work, dry):
    """A run refuses a data set that is not on disk; a dry run plans it (a config is checked
    on a machine without its data) with the same line: where it looked, how to prepare it."""
    _, out, cwd = work
    cfg = tmp_path / "easier.yaml"
    cfg.write_text(yaml.safe_dump(EASIER))
    root = tmp_path / "no-such-data"
    before = _tree(tmp_path)
    r = _run("--config", cfg, "--out", out, *(["--dry-run"] if dry else []),
             "--set", "data.name=tiny_imagenet", f"data.root={root}", cwd=cwd)
    if dry:
        assert r.returncode == 0, r.stderr
        assert "data:   tiny_imagenet: not on disk (see 'missing' below)" in r.stdout
        assert r.stdout.endswith("missing (a run refuses to start without them):\n"
                                 f"  - {_missing_data(root)}\n")
    else:
        assert _error(r) == _missing_data(root)
    assert not root.exists()
    assert _tree(tmp_path) == before  # refused before the run folder is made


# --- weights files (model.pretrained) ----------------------------------------------------------

class _Payload:
    """Unpickling this creates `path`: proof that the file's code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A folder of weights files, bad in one way each, and the payload's marker path."""
    from safetensors.torch import save_file

    from converters import read_file, torch_reference
    d = tmp_path_factory.mktemp("weights")
    state = torch_reference.build("resnet18_cifar", num_classes=10, width=8).state_dict()
    torch.save(state, d / "good.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "good.safetensors"))
    for name in ("good.pth", "good.safetensors"):
        assert len(read_file(d / name)[0]) == len(state)  # whole, the files are fine
        data = (d / name).read_bytes()
        (d / name.replace("good", "truncated")).write_bytes(data[: len(data) // 2])
    other = torch_reference.build("mobilenet_v2_cifar", num_classes=10, width_mult=0.25)
    torch.save(other.state_dict(), d / "mobilenet_v2_cifar.pth")
    near = torch_reference.build("resnet18", num_classes=10, width=8)  # 7x7 stem
    torch.save(near.state_dict(), d / "resnet18.pth")
    marker = d / "payload-ran"
    torch.save({**state, "extra": _Payload(marker)}, d / "payload.pth")
    (d / "payload_raw.pth").write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    assert not marker.exists()
    return d, marker


@functools.lru_cache(maxsize=None)
def _dry_pretrained(path: Path):
    """A dry run of EASIER with `model.pretrained: path` from an empty folder next to it."""
    d = path.parent
    cfg, cwd = d / "easier.yaml", d / "cwd"
    if not cfg.exists():
        cfg.write_text(yaml.safe_dump(EASIER))
        cwd.mkdir()
    before = _tree(d)
    r = _run("--config", cfg, "--out", d / "runs", "--dry-run", "--set",
             f"model.pretrained={path}", cwd=cwd)
    assert _tree(d) == before  # a dry run writes nothing, refused or not
    return r


def test_pretrained_from_another_architecture(weights):
    path = weights[0] / "mobilenet_v2_cifar.pth"
    msg = _error(_dry_pretrained(path))
    assert msg.startswith(f"{path} do not fit 'resnet18_cifar': missing keys ['conv1.weight'")
    assert "unexpected keys ['features.0.0.weight'" in msg and "wrong arch=" in msg


def test_pretrained_of_a_near_architecture_names_the_file_the_key_and_both_shapes(weights):
    path = weights[0] / "resnet18.pth"
    msg = _error(_dry_pretrained(path))
    assert msg.startswith(f"{path} do not fit 'resnet18_cifar': 'conv1.weight' has shape "
                          "(8, 3, 7, 7), the model expects (8, 3, 3, 3)")


@pytest.mark.parametrize("name,says", [
    ("truncated.pth", "is not a readable torch file"),
    ("truncated.safetensors", "is not a readable safetensors file"),
])
def test_truncated_weights(weights, name, says):
    path = weights[0] / name
    msg = _error(_dry_pretrained(path))
    assert msg.startswith(f"{path} {says} (")
    assert "it may be truncated: re-download or re-" in msg


@pytest.mark.parametrize("name", ["payload.pth", "payload_raw.pth"])
def test_pickle_payload_is_refused_and_never_runs(weights, name):
    d, marker = weights
    path = d / name
    msg = _error(_dry_pretrained(path))  # one plain line: no torch warning, no escape codes
    assert msg.startswith(f"{path} holds Python objects besides tensors")
    assert msg.endswith("and was refused without being run; save a plain state dict "
                        "(torch.save(model.state_dict(), ...)) or safetensors")
    assert "\x1b" not in msg and "weights_only=False" not in msg
    assert not marker.exists()


@pytest.mark.slow
def test_pretrained_from_another_architecture_in_a_real_run(tmp_path, weights):
    (tmp_path / "cwd").mkdir()
    cfg = tmp_path / "easier.yaml"
    cfg.write_text(yaml.safe_dump(EASIER))
    path = weights[0] / "mobilenet_v2_cifar.pth"
    before = _tree(tmp_path)
    r = _run("--config", cfg, "--out", tmp_path / "runs", "--set", f"model.pretrained={path}",
             cwd=tmp_path / "cwd")
    assert _error(r).startswith(f"{path} do not fit 'resnet18_cifar': missing keys")
    # refused before the run folder is made: the corrected config may use the same name
    assert _tree(tmp_path) == before


# --- a fused model below its smallest input size -------------------------------------------------

def test_fused_export_below_its_smallest_input_size(tmp_path, work):
    """A pruned and fused export's border terms are placed relative to the edges: checked
    against its own torch program it matches at the size it was merged at and at another;
    below the smallest size it runs at, it is refused with that size and the fix."""
    import converters
    import jaxprune
    import models
    from models.net import randomize_bn
    m = randomize_bn(models.create("resnet18_cifar", num_classes=10, width=4))
    # a block of the last stage fused: border terms on 4x4 maps, so the smallest input (17)
    # is above the smallest size a run may check (8)
    jaxprune.linearize(m, ["layer1.0.relu1", "layer4.1.relu1"])
    fused = jaxprune.merge(m, cost="none")
    assert any(getattr(layer, "edge_bias", None) is not None for layer in fused.layers.values())
    (kind, (h0, w0)) = fused.input_sizes()
    assert kind == "min" and 1 < h0 == w0 < 32
    converters.export(fused, tmp_path / "fused")
    _, out, cwd = work
    cfg = tmp_path / "fused.yaml"
    cfg.write_text(yaml.safe_dump({"name": "fused", "model": {"name": "resnet18_cifar"},
                                   "method": {"name": "parity", "source": str(tmp_path / "fused"),
                                              "sizes": [32, 37]}}))
    r = _run("--config", cfg, "--out", out, cwd=cwd)
    assert r.returncode == 0 and r.stdout.count("pass") == 2, (r.stdout, r.stderr[-2000:])
    msg = _error(_run("--config", cfg, "--out", out, "--set", "name=other", "--set",
                      f"method.sizes=[{h0 - 1}]", cwd=cwd))
    assert msg.startswith(f"this merged model runs at inputs of at least {h0}x{w0}")
    assert msg.endswith("use a larger input, or merge the linearized model for your input "
                        "size: jaxprune.merge(m, input_size=(H, W))")
    assert not (out / "other").exists()


# --- every config key, one value outside its range each ---------------------------------------

# A config per method that is valid and quick to check (model shapes only).
METHOD_CONFIGS = {"easier": ROOT / "configs/demo.yaml",
                  "depthshrinker": ROOT / "configs/depthshrinker/digits-small.yaml",
                  "snl": ROOT / "configs/depthshrinker/digits-snl.yaml",
                  "parity": ROOT / "configs/parity.yaml",
                  "layermerge": ROOT / "configs/layermerge/digits.yaml"}


def _fields(cls, prefix: str):
    """(dotted key, field, type) of every key of section `cls`, nested sections expanded."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            if f.name != "method":  # a method's keys are its own dataclass's
                yield from _fields(hints[f.name], key + ".")
        else:
            yield key, f, hints[f.name]


def _all_keys():
    """(method whose config the key is tried on, dotted key, field, type) for every key."""
    for key, f, tp in _fields(jconfig.Config, ""):
        yield "easier", key, f, tp
    for name in methods.available():
        for key, f, tp in _fields(methods.get(name).config, "method."):
            if key != "method.name":
                yield name, key, f, tp
    yield "easier", "method.name", None, str


def _outside(r: jconfig.Range, tp) -> object:
    """A value of type `tp` (the item type for a list) outside range `r`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None: X
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
    if r.choices is not None:
        bad = 2 if all(isinstance(c, int) for c in r.choices) else "nonexistent"
    elif r.pattern is not None:
        bad = "../x"
    elif r.ge is not None:
        bad = r.ge - 1
    elif r.gt is not None:
        bad = r.gt
    else:
        bad = r.le + 1
    if item is int:
        bad = int(bad)
    return [bad] if typing.get_origin(tp) is list else bad


def _elsewhere(tmp: Path) -> dict:
    """Keys checked by what they name rather than a range: (value, extra overrides, part of
    the error, whether it is an input that may be missing: a dry run then plans it)."""
    a_file = tmp / "a_file.txt"
    a_file.write_text("not weights\n")
    return {
        "out": (str(a_file / "runs"), [], f"{a_file} is a file, not a folder", False),
        "model.name": ("resnet19", [], "unknown model 'resnet19'", False),
        "model.pretrained": (str(a_file), [], f"{a_file} is neither a torch file", False),
        "model.options": ("{width: 0}", [], "cannot be built with options {'width': 0}", False),
        "model.source": (str(a_file), [f"model.name=torch:{a_file}", "model.options={}"],
                         f"{a_file}: it is not a .pt2 archive", False),
        "data.name": ("digitz", [], "unknown data set 'digitz'", False),
        "data.root": (str(tmp / "no-data"), ["data.name=cifar10"], "CIFAR-10 not found", True),
        "method.name": ("easierr", [], "unknown method 'easierr'", False),
        "method.source": (str(a_file), [], f"{a_file} is neither a torch file", False),
        "method.latency_table": (str(tmp / "no-table.json"), [],
                                 f"method.latency_table: {tmp / 'no-table.json'} not found", True),
        "method.plan": (str(tmp / "no-plan.json"), ["method.target_speedup=null"],
                        f"method.plan: {tmp / 'no-plan.json'} not found", True),
        "method.search_run": (str(tmp / "no-search"), ["method.stage=finetune"],
                              f"method.search_run: {tmp / 'no-search'}/keep_lists.json not found",
                              True),
    }


def _main(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error(code: int, err: str) -> str:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err[len("error: "):-1]


def test_every_key_outside_its_range_is_one_error_before_anything_is_written(
        tmp_path, capsys, monkeypatch):
    """Every key of every section (each method's included) with a value outside its range,
    or naming something that is not there: the dry run and the run both refuse it with one
    `error:` line and exit 2, and nothing is written. A missing input (data set, search run)
    is a line of the dry run's plan and a refusal of the run."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() sets its own
    monkeypatch.chdir(tmp_path)
    elsewhere = _elsewhere(tmp_path)
    before = _tree(tmp_path)  # the run folders would be ./runs/<name>
    tried = set()
    for method, key, f, tp in _all_keys():
        r = f.metadata.get("range") if f is not None else None
        if r is not None:
            value = _outside(r, tp)
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
            where = f"{key}[0]" if isinstance(value, list) else key
            part, extra, missing = f"config key '{where}' must be {r.describe()}", [], False
        elif tp is bool:
            text, extra, part, missing = "maybe", [], f"config key '{key}' must be bool", False
        else:
            assert key in elsewhere, f"{key} has no range and no check: declare its range"
            text, extra, part, missing = elsewhere[key]
        args = ["--config", METHOD_CONFIGS[method], "--set", f"{key}={text}", *extra]
        code, stdout, err = _main(capsys, *args, "--dry-run")
        if missing:
            assert code == 0 and part in stdout, (key, err)
        else:
            assert part in _one_error(code, err), (key, err)
        assert part in _one_error(*_main(capsys, *args)[::2]), key
        assert _tree(tmp_path) == before, key
        tried.add(key)
    assert {"train.lr", "method.acc_budget", "method.ratio", "method.lam", "method.batch",
            "data.batch_size", "name", "seed"} <= tried


# --- one wrong value each on the demo config (dry run and run alike) ----------------------------

DEMO = ROOT / "configs/demo.yaml"


@pytest.mark.parametrize("override,message", [
    ("train.epochs=0", "config key 'train.epochs' must be >= 1, got 0"),
    ("model.num_classes=3", "the data set {data} has 10 classes, the model 3 (model.num_classes): "
                            "set model.num_classes to 10, or to null for the data set's count (a "
                            "pretrained classifier of another size is then re-initialised)"),
    ("train.lr=-0.1", "config key 'train.lr' must be > 0, got -0.1"),
    ("method.acc_budget=-1", "config key 'method.acc_budget' must be >= 0, got -1.0: a drop in "
                             "points of validation accuracy"),
    ("data.batch_size=63", "data.batch_size 63 is not a multiple of the 2 devices (every batch is "
                           "split evenly over them); use 62 or 64"),
], ids=["epochs", "num_classes", "lr", "acc_budget", "batch_size"])
def test_a_wrong_value_is_refused_by_the_dry_run_and_the_run(tmp_path, capsys, monkeypatch,
                                                             override, message):
    import jax
    assert jax.device_count() == 2  # conftest: two host devices
    monkeypatch.chdir(tmp_path)
    data = jconfig.load(DEMO).data.name
    for dry in (["--dry-run"], []):
        assert _one_error(*_main(capsys, "--set", override, *dry)[::2]) == message.format(data=data)
    assert list(tmp_path.iterdir()) == []


def test_out_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for dry in (["--dry-run"], []):
        msg = _one_error(*_main(capsys, "--out", blocker / "runs", *dry)[::2])
        assert msg == (f"cannot make the run folder {blocker}/runs/{jconfig.load(DEMO).name}: "
                       f"{blocker} is a file, not a folder; set another out (--out) or name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_pretrained_head_of_another_size_is_reinitialised_not_refused(tmp_path, capsys):
    """Weights with 100 classes for a 10-class data set: every weight but the classifier's is
    loaded (the documented re-initialisation); only model.num_classes set to another count
    than the data set's is refused."""
    from converters import torch_reference
    path = tmp_path / "hundred.pth"
    torch.save(torch_reference.build("resnet18_cifar", num_classes=100, width=8).state_dict(), path)
    args = ["--out", tmp_path / "runs", "--dry-run", "--set", "model.name=resnet18_cifar",
            "model.options={width: 8}", f"model.pretrained={path}", "data.name=digits"]
    code, out, err = _main(capsys, *args)
    assert code == 0, err
    assert f"10 classes, 176,402 parameters, weights from {path} (read and checked)" in out
    assert "the model 3" in _one_error(*_main(capsys, *args, "model.num_classes=3")[::2])


def test_a_diverged_run_reports_only_the_files_it_wrote(tmp_path, capsys):
    """--set train.lr=1e12 on the demo: one line, exit 2, and a report.md that names what the
    run folder holds (no epoch was logged nor checkpointed: neither is named)."""
    code, _, err = _main(capsys, "--out", tmp_path, "--set", "train.lr=1e12", "train.epochs=1",
                         "method.pretrain_epochs=0", "model.options={width: 4}",
                         "data.image_size=16", "name=diverged")
    last = err.splitlines(keepends=True)[-1]  # after the progress bars
    assert _one_error(code, last).startswith("non-finite training loss in round 0, epoch 1/1")
    run_dir = tmp_path / "diverged"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "report.md"]
    report = (run_dir / "report.md").read_text()
    assert report.endswith("The run folder holds:\n- `config.yaml`: the resolved config\n")
    assert "metrics.jsonl" not in report and "checkpoints" not in report
