"""Config validation: every bad key, type or value is a one-line UserError that says what to fix."""
import re
from pathlib import Path

import pytest
import yaml

from jaxprune import config
from jaxprune.errors import UserError

PARITY = {"name": "parity"}


def test_defaults_and_round_trip_through_yaml(tmp_path):
    cfg = config.from_dict({"name": "x", "model": {"options": {"width": 8}}, "method": PARITY})
    assert cfg.train.lr == 0.1 and cfg.data.name == "digits" and cfg.method.sizes == []
    path = tmp_path / "c.yaml"
    path.write_text(config.dump(cfg))
    assert config.load(path) == cfg


@pytest.mark.parametrize("raw,match", [
    ({"trian": {}}, r"unknown config key 'trian'; did you mean 'train'"),
    ({"train": {"lr_": 0.1}}, r"unknown config key 'train.lr_'; did you mean 'train.lr'"),
    ({"model": {"option": {}}}, r"'model.option'; did you mean 'model.options'"),
    ({"method": {"name": "parity", "sizs": [32]}}, r"'method.sizs'; did you mean 'method.sizes'"),
])
def test_unknown_key_names_the_closest_valid_key(raw, match):
    with pytest.raises(UserError, match=match):
        config.from_dict(raw)


@pytest.mark.parametrize("raw,match", [
    ({"train": {"epochs": "ten"}}, r"'train.epochs' must be int, got 'ten' \(str\)"),
    ({"train": {"epochs": True}}, r"'train.epochs' must be int"),      # a bool is not a count
    ({"train": {"epochs": 2.5}}, r"'train.epochs' must be int"),
    ({"train": {"lr": "fast"}}, r"'train.lr' must be float"),
    ({"model": {"num_classes": [10]}}, r"'model.num_classes' must be int or null"),
    ({"method": {"name": "parity", "sizes": [32, "big"]}}, r"'method.sizes\[1\]' must be int"),
    ({"model": "resnet18"}, r"'model' must be a mapping"),
    ({"method": "parity"}, r"'method' must be a mapping"),
])
def test_wrong_type_names_the_key_and_the_type(raw, match):
    with pytest.raises(UserError, match=match):
        config.from_dict(raw)


def test_yaml_exponent_strings_are_floats():
    # YAML 1.1 reads 1e-4 (no dot) as a string; a learning rate written so must still work.
    assert config.from_dict({"train": {"weight_decay": "1e-4"}, "method": PARITY}).train.weight_decay == 1e-4


def test_bad_choice_lists_the_choices():
    with pytest.raises(UserError, match=r"'train.optimizer' must be one of \('sgd', 'adam'\), "
                                         r"got 'rmsprop'"):
        config.from_dict({"train": {"optimizer": "rmsprop"}, "method": PARITY})


def test_unknown_method_is_named():
    with pytest.raises(UserError, match=r"unknown method 'parit' \(method.name\); did you mean "
                                         r"'parity'"):
        config.from_dict({"method": {"name": "parit"}})


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "a\\b", "", ".", "..", ".hidden",
                                  "two words", "x\n"])
def test_run_name_must_be_a_plain_folder_name(name):
    # <out>/<name> is the run folder: a name must not reach outside 'out' or hide there
    with pytest.raises(UserError, match=r"config key 'name' must be a plain folder name .*got "
                                         + re.escape(repr(name)) + r": the run folder is "
                                         r"<out>/<name>; put folders in 'out'"):
        config.from_dict({"name": name, "method": PARITY})


@pytest.mark.parametrize("name", ["run", "ds-mbv2-140-A", "easier_resnet18_cifar10", "v1.2", "_x"])
def test_plain_run_names_are_kept(name):
    assert config.from_dict({"name": name, "method": PARITY}).name == name

def test_set_overrides_are_read_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: base\nmethod: {name: parity}\ntrain: {lr: 0.1}\n")
    cfg = config.load(path, ["train.lr=0.01", "model.options.width=16", "method.sizes=[32, 40]",
                             "model.num_classes=7", "name=other", "data.root=/data/x y"])
    assert cfg.train.lr == 0.01 and cfg.name == "other"
    assert cfg.model.options == {"width": 16} and cfg.model.num_classes == 7
    assert cfg.method.sizes == [32, 40] and cfg.data.root == "/data/x y"
    assert config.load(path, ["model.num_classes="]).model.num_classes is None  # empty -> null


@pytest.mark.parametrize("text,match", [
    ("train.lr", r"--set expects key=value"),
    ("train.lrr=0.1", r"'train.lrr'; did you mean 'train.lr'"),
    ("train.epochs=[1", r"--set train.epochs=\[1: the value is not valid YAML"),
])
def test_bad_overrides(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        config.load(None, ["method.name=parity", text])


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError, match="holds a YAML tag that would build a Python object.*remove the tag"):
        config.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("text,match", [
    ("- a\n- b\n", "must hold a mapping"),
    ("name: [unclosed\n", "is not valid YAML"),
])
def test_malformed_files(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=match):
        config.load(path)
    with pytest.raises(UserError, match="config file not found"):
        config.load(tmp_path / "missing.yaml")


def test_dump_is_plain_yaml():
    cfg = config.from_dict({"method": PARITY})
    # safe_load reads it back: no Python-specific tags in a run folder's config.yaml
    assert yaml.safe_load(config.dump(cfg))["method"] == {"name": "parity", "source": "random",
                                                          "sizes": [], "batch": 2}


def test_validating_a_config_imports_no_training_code():
    """Each method's options are registered apart from its run code: reading and checking
    every shipped config imports neither JAX nor any training, model or torch module."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    script = (
        "import sys, pathlib\n"
        "from jaxprune import config\n"
        "for p in sorted(pathlib.Path('configs').rglob('*.yaml')):\n"
        "    config.load(p)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('jax', 'flax', 'optax', 'orbax', 'torch', 'grain', 'models') "
        "or m.startswith(('jaxprune.train', 'jaxprune.merging.', 'jaxprune.methods.easier.method'))))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs/layermerge").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_layermerge_configs_pass_every_check_a_run_starts_with(path, tmp_path, monkeypatch):
    """Each shipped layermerge config parses, passes its method's rules (one budget, the
    options built) and fits its model: the model builds (shapes only) and has a search space
    (`check_model`). Run where neither ImageNet nor the weights files are: those are
    the only things missing, and a run would name them."""
    from jaxprune import preflight
    monkeypatch.chdir(tmp_path)
    cfg = config.load(path, [f"out={tmp_path / 'runs'}"])
    assert cfg.method.name == "layermerge"
    assert (cfg.method.target_speedup or cfg.method.latency_ms) and cfg.method.plan is None
    found = preflight.check(cfg)
    for line in found.missing:
        assert line.startswith(("ImageNet-2012 not found", "model.pretrained: weights/")), line


# -- ranges: declared once beside each key, documented as declared ---------------------------

def _keys_and_fields():
    """{dotted key: (field, type)} of every key, each method's as `<method>: method.<key>`."""
    import dataclasses
    import typing

    from jaxprune import methods
    out = {}
    for prefix, cls in (("", config.Config), ("model.", config.ModelConfig),
                        ("data.", config.DataConfig), ("train.", config.TrainConfig)):
        hints = typing.get_type_hints(cls)
        out.update({prefix + f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)
                    if not dataclasses.is_dataclass(hints[f.name])})
    for name in methods.available():
        cls = methods.get(name).config
        hints = typing.get_type_hints(cls)
        out.update({f"{name}: method.{f.name}": (f, hints[f.name])
                    for f in dataclasses.fields(cls) if f.name != "name"})
    return out


def _readme_ranges() -> dict[str, str]:
    """{key: its range cell} from README.md's two config tables."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Config keys"):text.index("## Layout")]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            out[cells[0].strip("`")] = cells[2]
        elif len(cells) == 5 and cells[1].startswith("`"):
            for key in cells[1].split(", "):
                out[f"{cells[0]}: method.{key.strip('`')}"] = cells[3]
    return out


def test_readme_lists_every_key_with_its_declared_range():
    readme = _readme_ranges()
    keys = _keys_and_fields()
    assert set(keys) <= set(readme), sorted(set(keys) - set(readme))
    for key, (f, tp) in keys.items():
        r = f.metadata.get("range")
        if r is not None:
            listed = "list" in str(tp)
            assert readme[key] == ("each " if listed else "") + r.describe(), key


@pytest.mark.parametrize("r,text,inside,outside", [
    (config.Range(ge=1), ">= 1", [1, 7], [0, -1]),
    (config.Range(gt=0), "> 0", [1e-9, 3.0], [0.0, -1.0]),
    (config.Range(ge=0, le=1), "in [0, 1]", [0.0, 1.0], [-0.1, 1.1]),
    (config.Range(gt=0, le=1), "in (0, 1]", [1.0], [0.0]),
    (config.Range(choices=("a", "b")), "one of ('a', 'b')", ["a"], ["c"]),
])
def test_a_range_says_what_it_accepts(r, text, inside, outside):
    assert r.describe() == text
    for v in inside:
        r.check("k", v)
        r.check("k", [v, None])  # every item of a list; null is always in range
    for v in outside:
        with pytest.raises(UserError, match=rf"^config key 'k' must be {re.escape(text)}, "
                                             rf"got {re.escape(repr(v))}$"):
            r.check("k", v)
        with pytest.raises(UserError, match=r"^config key 'k\[1\]'"):
            r.check("k", [inside[0], v])


def test_rules_between_keys_are_checked_when_a_config_is_read():
    with pytest.raises(UserError, match=r"train.min_lr \(0.5\) must be at most train.lr \(0.1\)"):
        config.from_dict({"train": {"schedule": "cosine", "min_lr": 0.5}})
    config.from_dict({"train": {"schedule": "step", "min_lr": 0.5}})  # unused by a step schedule
    with pytest.raises(UserError, match="set exactly one of method.relu_budget"):
        config.from_dict({"method": {"name": "snl", "relu_budget": 100}})
    with pytest.raises(UserError, match="model.pretrained is not used: move it to method.source"):
        config.from_dict({"model": {"pretrained": "w.pth"}, "method": PARITY})
    with pytest.raises(UserError, match=r"method.lat_before has 2 values, method.lat_after 1"):
        config.from_dict({"method": {"name": "depthshrinker", "lat_before": [1, 2],
                                     "lat_after": [1]}})
