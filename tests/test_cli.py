"""`python run.py`: dry run, run folders, refusal of a changed config, one-line errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import run as cli
from jaxprune import config, methods, runner
from jaxprune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "name": "parity8",
    "model": {"name": "resnet18_cifar", "num_classes": 10, "options": {"width": 8}},
    "method": {"name": "parity", "sizes": [32]},
}


def _run(*args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # run.py sets its own
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "parity.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_dry_run_prints_config_and_plan_and_writes_nothing(tmp_path, cfg_file):
    out = tmp_path / "runs"
    r = _run("--config", cfg_file, "--out", out, "--dry-run", "--set", "seed=3")
    assert r.returncode == 0, r.stderr
    resolved, plan = r.stdout.split("# plan")
    assert yaml.safe_load(resolved)["seed"] == 3
    assert yaml.safe_load(resolved)["out"] == str(out)
    assert "model:  resnet18_cifar {width: 8}, 10 classes" in plan
    assert "sites:  17" in plan and "layer1.0.relu1" in plan and "layer4.1.relu2" in plan
    assert "method: parity {source: random, sizes: [32], batch: 2}" in plan
    assert f"run folder: {out / 'parity8'} (new)" in plan
    assert not out.exists()


@pytest.mark.slow
def test_run_writes_the_folder_and_a_changed_config_is_refused(tmp_path, cfg_file):
    out = tmp_path / "runs"
    r = _run("--config", cfg_file, "--out", out)
    assert r.returncode == 0, r.stderr
    run_dir = out / "parity8"
    assert "pass" in r.stdout and f"run folder: {run_dir}" in r.stdout
    saved = config.load(run_dir / "config.yaml")
    assert saved == config.load(cfg_file, [f"out={out}"])
    results = yaml.safe_load((run_dir / "results.json").read_text())  # JSON is YAML
    assert results["passed"] and results["rows"][0]["size"] == 32

    r = _run("--config", cfg_file, "--out", out, "--set", "seed=1", "--set", "method.batch=4")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: run folder")
    assert "seed, method.batch differ" in r.stderr and "pick another name" in r.stderr
    assert config.load(run_dir / "config.yaml") == saved  # untouched


@pytest.mark.parametrize("args,match", [
    (["--set", "trian.epochs=2"], "error: unknown config key 'trian'; did you mean 'train'?"),
    (["--set", "model.name=resnet19"], "error: unknown model 'resnet19'; did you mean"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, cfg_file, args, match):
    r = _run("--config", cfg_file, "--out", tmp_path, *args)
    assert r.returncode == 2
    assert r.stderr.startswith(match) and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == [cfg_file]


@pytest.fixture
def probe(monkeypatch):
    """The method `probe` registered (tests/probe_method.py); yields the contexts it ran in."""
    from tests import probe_method
    probe_method.CALLS.clear()
    monkeypatch.setitem(methods._METHODS, "probe",
                        methods.Method("probe", config.MethodConfig, "tests.probe_method"))
    yield probe_method.CALLS


def test_same_config_calls_the_method_again_in_its_folder(tmp_path, probe):
    cfg = config.from_dict({"name": "r", "out": str(tmp_path), "method": {"name": "probe"}})
    run_dir, _ = runner.run(cfg)
    # another spelling of the same folder is the same run: 'out' says where, not what
    again = config.from_dict({**config.to_dict(cfg), "out": f"{tmp_path}/./"})
    assert runner.run(again)[0].resolve() == run_dir.resolve()
    assert [ctx.run_dir.resolve() for ctx in probe] == [run_dir.resolve()] * 2
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "call1", "call2", "config.yaml", "report.md", "results.json"]
    assert "exists with this config: the method resumes there" in runner.plan(cfg)


def test_resume_continues_a_run_folder_from_its_own_config(tmp_path, monkeypatch, capsys, probe):
    cfg = config.from_dict({"name": "r", "out": str(tmp_path / "old"), "seed": 7,
                            "method": {"name": "probe"}})
    run_dir, _ = runner.run(cfg)
    moved = tmp_path / "moved"
    run_dir.rename(moved)  # a run folder may move (another disk, another name): it still resumes
    assert cli.main(["--resume", str(moved)]) == 0
    resumed, where = probe[-1].cfg, probe[-1].run_dir
    assert where == moved and resumed.seed == 7 and resumed.method.name == "probe"
    monkeypatch.chdir(moved)
    assert cli.main(["--resume", "."]) == 0 and probe[-1].run_dir == moved  # '.' has a name too

    assert cli.main(["--resume", str(tmp_path / "nothing")]) == 2
    assert cli.main(["--resume", str(moved), "--set", "seed=1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-2] == (f"error: --resume {tmp_path / 'nothing'}: no {tmp_path / 'nothing'}"
                       f"/config.yaml; give the folder of an earlier run (<out>/<name>)")
    assert err[-1] == ("error: --resume takes the config saved in the run folder; leave out "
                       "--config, --set and --out")
    assert len(probe) == 3


def test_a_foreign_folder_is_not_taken_over(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    cfg = config.from_dict({"name": "r", "out": str(tmp_path), "method": {"name": "parity"}})
    with pytest.raises(UserError, match="holds no config.yaml"):
        runner.prepare_run_dir(cfg)


def test_xla_gets_one_host_device_per_core_unless_the_user_chose(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    cli._one_xla_device_per_core()
    assert os.environ["XLA_FLAGS"] == (f"--xla_dump_to=/tmp/x "
                                       f"--xla_force_host_platform_device_count={os.cpu_count()}")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    cli._one_xla_device_per_core()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"


def test_set_takes_several_pairs_after_one_flag(tmp_path, capsys):
    args = ["--out", tmp_path, "--dry-run", "--set", "seed=3", "train.epochs=2",
            "--set", "method.max_rounds=1"]
    assert cli.main([str(a) for a in args]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out.split("# plan")[0])
    assert (resolved["seed"], resolved["train"]["epochs"], resolved["method"]["max_rounds"]) == (
        3, 2, 1)


def test_dry_run_of_an_imagenet_config_without_imagenet(tmp_path, capsys, monkeypatch):
    """A config is checked on a machine without its data (a login node): the plan lists the
    data set and the weights file that are not there, with what provides them; the run
    itself refuses to start without them, before its folder is made."""
    monkeypatch.chdir(tmp_path)
    path = ROOT / "configs/depthshrinker/mbv2-140.yaml"
    assert cli.main(["--config", str(path), "--dry-run"]) == 0
    plan = capsys.readouterr().out.split("# plan\n")[1]
    assert "data:   imagenet2012: not on disk (see 'missing' below)" in plan
    assert "mobilenet_v2 {width_mult: 1.4, layout: timm, dropout: 0.0}, 1000 classes" in plan
    assert plan.endswith(
        "missing (a run refuses to start without them):\n"
        "  - ImageNet-2012 not found: looked for a prepared tfds data set in data/imagenet2012. "
        "Prepare it with: python -m jaxprune.data prepare imagenet2012 --root data (tfds cannot "
        "download ImageNet: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from "
        "image-net.org) in data/downloads/manual first)\n"
        "  - model.pretrained: weights/mobilenetv2_140_ra-21a4e913.pth not found; download the "
        "weights there or correct the path\n")
    assert cli.main(["--config", str(path)]) == 2
    assert capsys.readouterr().err.startswith("error: ImageNet-2012 not found")
    assert list(tmp_path.iterdir()) == []


def test_parity_of_a_bfloat16_checkpoint(tmp_path, capsys):
    """`method: parity` on a bfloat16 state dict: read as float32 and checked, exit 0."""
    import torch

    from converters import torch_reference
    t = torch_reference.build("resnet18_cifar", num_classes=10, width=8)
    torch.save({k: v.bfloat16() if v.is_floating_point() else v
                for k, v in t.state_dict().items()}, tmp_path / "bf16.pth")
    code = cli.main(["--config", str(ROOT / "configs/parity.yaml"), "--out", str(tmp_path),
                     "--set", f"method.source={tmp_path / 'bf16.pth'}", "method.sizes=[32]"])
    out = capsys.readouterr().out
    assert code == 0 and "| 32 |" in out and "pass" in out
