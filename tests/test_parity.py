"""`method: parity` and the torch originals it compares against (converters/torch_reference.py)."""
import dataclasses
import json

import pytest
import torch

from converters import torch_reference
from jaxprune import config, runner
from jaxprune.errors import UserError


def _cfg(**method):
    return config.from_dict({"model": {"name": "resnet18_cifar", "options": {"width": 8}},
                             "method": {"name": "parity", **method}})


def _run(cfg, tmp_path) -> dict:
    """The parity method run by the runner into <tmp_path>/parity/; its results."""
    return runner.run(dataclasses.replace(cfg, out=str(tmp_path), name="parity"))[1]


def test_checkpoint_file_matches_at_every_size(tmp_path, capsys):
    t = torch_reference.randomize(torch_reference.build("resnet18_cifar", num_classes=7, width=8))
    torch.save(t.state_dict(), tmp_path / "w.pth")
    results = _run(_cfg(source=str(tmp_path / "w.pth"), sizes=[32, 35]), tmp_path)
    assert results["passed"] and results["num_classes"] == 7  # read from the checkpoint
    assert [r["size"] for r in results["rows"]] == [32, 35]
    assert all(0 <= r["max_abs_diff"] <= 1e-4 for r in results["rows"])
    assert json.loads((tmp_path / "parity" / "results.json").read_text()) == results
    table = capsys.readouterr().out
    assert "max |Δ logits|" in table and table.count("pass") == 2


def test_a_real_mismatch_fails_and_is_recorded(tmp_path, monkeypatch, capsys):
    build = torch_reference.build

    def off_by_eps(*args, **kwargs):
        t = build(*args, **kwargs)
        t.layer2[0].bn1.eps = 0.1  # a converter that lost BatchNorm's epsilon would look so
        return t

    monkeypatch.setattr(torch_reference, "build", off_by_eps)
    with pytest.raises(UserError, match=r"parity failed for resnet18_cifar \(32 px: .*tolerance "
                                         r"1.0e-04\); details in .*results.json"):
        _run(_cfg(sizes=[32]), tmp_path)
    saved = json.loads((tmp_path / "parity" / "results.json").read_text())
    assert saved["passed"] is False and saved["rows"][0]["max_abs_diff"] > 1e-4
    assert "FAIL" in capsys.readouterr().out


def test_bad_options(tmp_path):
    with pytest.raises(UserError, match="move it to method.source"):
        cfg = _cfg()
        _run(config.from_dict({**config.to_dict(cfg), "model": {
            **config.to_dict(cfg)["model"], "pretrained": "w.pth"}}), tmp_path)
    with pytest.raises(UserError, match=r"config key 'method.sizes\[1\]' must be >= 8, got 0"):
        _run(_cfg(sizes=[32, 0]), tmp_path)
    absent = tmp_path / "absent.pth"  # a missing input: refused by the preflight
    with pytest.raises(UserError, match=f"method.source: {absent} not found; correct "
                                        f"method.source"):
        _run(_cfg(source=str(absent)), tmp_path)
    assert not (tmp_path / "parity").exists()  # refused runs leave no run folder


def test_torch_reference_errors():
    with pytest.raises(UserError, match=r"no torch reference for model 'resnet18_cifr'; did you "
                                         r"mean 'resnet18_cifar'"):
        torch_reference.build("resnet18_cifr")
    with pytest.raises(UserError, match=r"has no option 'widht'; valid options: \['width'\]"):
        torch_reference.build("resnet18", widht=8)
    with pytest.raises(UserError, match=r"timm has no MobileNetV2 of width_mult 0.3 .*"
                                         r"'mobilenetv2_140'"):
        torch_reference.build("mobilenet_v2", layout="timm", width_mult=0.3)
    assert torch_reference.tolerance("swin_t") == 5e-4 and torch_reference.tolerance("vgg16_bn") == 1e-4


def test_narrowed_resnet_has_the_width_of_jaxprunes():
    t = torch_reference.build("resnet18", num_classes=3, width=8)
    assert t.conv1.weight.shape == (8, 3, 7, 7) and t.layer4[1].conv2.weight.shape == (64, 64, 3, 3)
    assert t.layer2[0].downsample[0].weight.shape == (16, 8, 1, 1) and t.fc.weight.shape == (3, 64)


@pytest.mark.slow
def test_cifar_mobilenet_strides(tmp_path):
    """EASIER's CIFAR MobileNetV2 (stem and stage 2 at stride 1) through the parity method."""
    t = torch_reference.build("mobilenet_v2_cifar", width_mult=0.35)
    assert t.features[0][0].stride == (1, 1) and t.features[2].conv[1][0].stride == (1, 1)
    assert t.features[4].conv[1][0].stride == (2, 2)
    cfg = config.from_dict({"model": {"name": "mobilenet_v2_cifar", "num_classes": 10,
                                      "options": {"width_mult": 0.35}},
                            "method": {"name": "parity", "sizes": [32]}})
    assert _run(cfg, tmp_path)["passed"]
