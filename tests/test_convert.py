"""Bad inputs at the torch boundary: each is refused with a UserError that names the problem."""
import pickle
import urllib.error

import numpy as np
import pytest
import torch
from flax import nnx

import converters
import jaxprune
import models
from converters import torch_reference
from jaxprune.context import build_model
from jaxprune.config import from_dict
from jaxprune.errors import UserError
from jaxprune.torch_compat import torchvision


@pytest.fixture(scope="module")
def state():
    """A width-8 CIFAR ResNet-18's torch state dict (tensors)."""
    return torch_reference.build("resnet18_cifar", num_classes=10, width=8).state_dict()


def test_wrong_arch(state):
    with pytest.raises(UserError, match=r"not a 'vgg16_bn'.*check arch="):
        converters.from_torch(state, arch="vgg16_bn")
    with pytest.raises(UserError, match=r"unknown model 'resnet18_cifr'; did you mean "
                                         r"'resnet18_cifar'"):
        converters.from_torch(state, arch="resnet18_cifr")
    # the torchvision-stem ResNet is recognised but its 7x7 stem is not this 3x3 one
    with pytest.raises(UserError, match=r"not a 'resnet18'"):
        converters.from_torch(state, arch="resnet18")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, state, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert converters.from_torch(path, arch="resnet18_cifar").spec.num_classes == 10
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"w\{}.*truncated".format(suffix)):
        converters.from_torch(path)


def test_wrong_shape_names_the_key_and_both_shapes(state):
    bad = dict(state)
    bad["layer2.0.conv2.weight"] = torch.zeros(16, 16, 1, 1)
    with pytest.raises(UserError, match=r"'layer2.0.conv2.weight'.*\(16, 16, 1, 1\).*"
                                         r"\(16, 16, 3, 3\)"):
        converters.from_torch(bad, arch="resnet18_cifar")


def test_missing_and_unexpected_keys_are_listed(state):
    bad = {k: v for k, v in state.items() if not k.startswith("layer3.1.bn1.")}
    bad["layer3.1.extra.weight"] = torch.zeros(3)
    with pytest.raises(UserError, match=r"missing keys \['layer3.1.bn1.weight'.*"
                                         r"unexpected keys \['layer3.1.extra.weight'\]"):
        converters.from_torch(bad, arch="resnet18_cifar")


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(UserError, match="expected a state dict"):
        converters.from_torch(path)
    with pytest.raises(UserError, match="torch weights not found"):
        converters.from_torch(tmp_path / "absent.pth")
    (tmp_path / "w.pkl").write_bytes(b"x")
    with pytest.raises(UserError, match=r"unsupported weights file type '.pkl'"):
        converters.from_torch(tmp_path / "w.pkl")
    with pytest.raises(UserError, match="from_torch takes a torch module"):
        converters.from_torch(42)


def test_unknown_site_lists_the_closest_names():
    m = models.create("resnet18_cifar", num_classes=10, width=8)
    with pytest.raises(UserError, match=r"unknown activation site 'layer1.0.relu3'; did you mean "
                                         r"'layer1.0.relu2' or 'layer1.0.relu1'"):
        jaxprune.linearize(m, ["layer1.1.relu1", "layer1.0.relu3"])
    assert jaxprune.linearized(m) == []  # all names are checked before any mask changes
    with pytest.raises(UserError, match="unknown activation site 'fc'"):
        jaxprune.linearize(m, ["fc"])  # a layer, but not an activation site


class _Payload:
    """Unpickling this creates `path`: proof that the file's code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_payload_is_refused_without_running(tmp_path, state):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    torch.save({**state, "extra": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(UserError, match=r"evil.pth holds Python objects besides tensors .*and was refused "
                                         r"without being run"):
        converters.from_torch(path)
    assert not marker.exists()
    # the same payload with an unusual file name is refused too, before any unpickling
    raw = tmp_path / "evil.bin"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError, match="refused without being run"):
        converters.from_torch(raw)
    assert not marker.exists()


def test_torchvision_weights_without_network(monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    torchvision()  # import it through the compat shim before patching its module
    import torchvision.models._api as api
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    # shapes only: every error below comes before a weight is touched
    resnet18, cifar = (nnx.eval_shape(lambda a=a: models.create(a, num_classes=10))
                       for a in ("resnet18", "resnet18_cifar"))
    with pytest.raises(UserError, match=r"could not download torchvision:IMAGENET1K_V1 .*"
                                         r"download https://\S+ elsewhere and set "
                                         r"model.pretrained to the file's path"):
        converters.load_pretrained(resnet18, "torchvision:IMAGENET1K_V1")
    with pytest.raises(UserError, match=r"no weights 'IMAGENET9K' for resnet18; available: "
                                         r"\['IMAGENET1K_V1'\]"):
        converters.load_pretrained(resnet18, "torchvision:IMAGENET9K")
    with pytest.raises(UserError, match=r"torchvision has no weights for 'resnet18_cifar'"):
        converters.load_pretrained(cifar, "torchvision:IMAGENET1K_V1")


def test_pretrained_file_keeps_a_resized_head_fresh(tmp_path, state):
    path = tmp_path / "w.pth"
    torch.save(state, path)
    cfg = from_dict({"model": {"name": "resnet18_cifar", "num_classes": 5, "pretrained": str(path),
                               "options": {"width": 8}}, "method": {"name": "parity"}})
    m = build_model(cfg, 5)
    assert np.array_equal(np.asarray(m.layers["layer1.0.conv1"].kernel.value),
                          state["layer1.0.conv1.weight"].numpy().transpose(2, 3, 1, 0))
    assert m.layers["fc"].kernel.value.shape == (64, 5)
