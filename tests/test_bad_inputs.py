"""Bad inputs on the command line: each is answered by one line `error: ...` on stderr
and exit status 2, no traceback, and writes nothing it should not.

Every test runs `python run.py` in a subprocess from an empty working folder, so a
stray write (to the working folder, next to the inputs, outside `out`) shows up as a
changed file tree. `--dry-run` is used wherever the error is raised while planning.
"""
import functools
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

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
    _, out, cwd = work
    cfg = tmp_path / "easier.yaml"
    cfg.write_text(yaml.safe_dump(EASIER))
    root = tmp_path / "no-such-data"
    before = _tree(tmp_path)
    r = _run("--config", cfg, "--out", out, *(["--dry-run"] if dry else []),
             "--set", "data.name=tiny_imagenet", "--set", f"data.root={root}", cwd=cwd)
    assert _error(r) == _missing_data(root)
    assert not root.exists()
    # a dry run writes nothing; a refused run leaves no run folder behind, so the corrected
    # config may use the same name
    assert _tree(tmp_path) == (before if dry else before | {"runs"})


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
    """A dry run of CONFIG with `model.pretrained: path` from an empty folder next to it."""
    d = path.parent
    cfg, cwd = d / "parity.yaml", d / "cwd"
    if not cfg.exists():
        cfg.write_text(yaml.safe_dump(CONFIG))
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
    # the refused run's folder is gone: the corrected config may use the same name
    assert _tree(tmp_path) == before | {"runs"}


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
    jaxprune.linearize(m, ["layer1.0.relu1", "layer2.1.relu1"])
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
