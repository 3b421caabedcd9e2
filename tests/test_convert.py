"""Bad inputs at the torch boundary: each is refused with a UserError that names the problem."""
import pickle
import urllib.error

import jax
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
    with pytest.raises(UserError, match=r"^these torch weights are a 'resnet18_cifar' "
                                         r"\{'num_classes': 10, 'width': 8\}, not a 'vgg16_bn': "
                                         r"pass arch='resnet18_cifar', or leave arch out$"):
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
    with pytest.raises(UserError, match=r"w.pkl is neither a torch file \(torch.save: zip or "
                                         r"pickle\) nor safetensors"):
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
                               "options": {"width": 8}}, "method": {"name": "easier"}})
    m = build_model(cfg, 5)
    assert np.array_equal(np.asarray(m.layers["layer1.0.conv1"].kernel.value),
                          state["layer1.0.conv1.weight"].numpy().transpose(2, 3, 1, 0))
    assert m.layers["fc"].kernel.value.shape == (64, 5)


# --- weights as people save them ------------------------------------------------------------

def _same_weights(m, state) -> bool:
    want = state["layer1.0.conv1.weight"].float().numpy().transpose(2, 3, 1, 0)
    return np.array_equal(np.asarray(m.layers["layer1.0.conv1"].kernel.value), want)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_torch_compile_prefixes_in_a_dict_and_a_file(tmp_path, state, prefix):
    """torch.compile's `_orig_mod.`, alone or with DataParallel's `module.` in either order,
    is unwrapped: the architecture is detected, and arch= agrees."""
    wrapped = {prefix + k: v for k, v in state.items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "w.pth")
    for source in (wrapped, tmp_path / "w.pth"):
        for arch in (None, "resnet18_cifar"):
            m = converters.from_torch(source, arch=arch)
            assert m.spec.arch == "resnet18_cifar" and _same_weights(m, state)


def test_a_compiled_module_is_unwrapped(state):
    t = torch_reference.build("resnet18_cifar", num_classes=10, width=8)
    compiled = torch.compile(t)  # nothing is compiled until it is called
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    for module in (compiled, torch.nn.DataParallel(compiled)):
        m = converters.from_torch(module)
        assert m.spec.arch == "resnet18_cifar" and _same_weights(m, t.state_dict())


def test_advice_on_weights_no_architecture_fits_never_goes_in_a_circle(state):
    """Weights under an unknown prefix: both with and without arch= the error names the
    prefix and how to strip it, and neither sends the user to the other."""
    wrapped = {f"encoder.{k}": v for k, v in state.items()}
    for arch in (None, "resnet18_cifar"):
        with pytest.raises(UserError) as e:
            converters.from_torch(wrapped, arch=arch)
        msg = str(e.value)
        first = ", ".join(repr(k) for k in sorted(wrapped)[:3])
        assert msg.endswith(f"every key starts with 'encoder.' ({first}, ...), a prefix a "
                            f"training wrapper adds and no architecture has: strip it, "
                            f"{{k.removeprefix('encoder.'): v for k, v in state.items()}}, and "
                            f"load that")
        assert "arch=" not in msg
    other = {"a.weight": torch.zeros(3, 2), "b.weight": torch.zeros(2)}
    with pytest.raises(UserError, match=r"^could not recognise the architecture of these torch "
                                         r"weights: their keys or shapes \('a.weight', 'b.weight'\) "
                                         r"fit none of the known architectures \(.*\): weights of "
                                         r"another or a modified network$"):
        converters.from_torch(other)
    with pytest.raises(UserError, match=r"^these torch weights are not a 'resnet18': their keys "
                                         r"or shapes .* fit neither it nor any other known"):
        converters.from_torch(other, arch="resnet18")


def test_a_checkpoint_with_weights_under_another_key_names_its_keys(state):
    with pytest.raises(UserError, match=r"^state dict: a checkpoint with keys \['epoch', "
                                         r"'weights'\] and no state dict under the keys looked for "
                                         r"\(state_dict, model, .*\); pass the one that holds the "
                                         r"weights, e.g. checkpoint\['weights'\]$"):
        converters.from_torch({"epoch": 3, "weights": dict(state)})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64,
                                   torch.float8_e4m3fn], ids=str)
def test_every_floating_dtype_torch_saves_is_read_as_float32(tmp_path, state, dtype):
    """A state dict, a .pth and a .safetensors file in any floating dtype: read as float32,
    the values those of the saved tensors."""
    from safetensors.torch import save_file
    low = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(low, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in low.items()}, str(tmp_path / "w.safetensors"))
    for source in (low, tmp_path / "w.pth", tmp_path / "w.safetensors"):
        m = converters.from_torch(source)
        assert _same_weights(m, low)
        assert all(v.dtype == np.float32 for v in jax.tree.leaves(nnx.state(m, nnx.Param)))


def test_file_type_is_read_from_the_content_not_the_name(tmp_path, state):
    from safetensors.torch import save_file
    torch.save({"state_dict": state, "epoch": 90}, tmp_path / "model_best.pth.tar")
    torch.save(state, tmp_path / "legacy.weights", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.bin"))
    for name in ("model_best.pth.tar", "legacy.weights", "model.bin"):
        assert _same_weights(converters.from_torch(tmp_path / name), state), name
    np.savez(tmp_path / "arrays.npz", a=np.zeros(2))
    (tmp_path / "empty.pth").write_bytes(b"")
    for name, says in (("arrays.npz", "is a zip archive but not a torch file (no data.pkl in "
                                      "it); give a file written by torch.save or safetensors"),
                       ("empty.pth", "is empty; re-download or re-save it")):
        with pytest.raises(UserError) as e:
            converters.from_torch(tmp_path / name)
        assert str(e.value) == f"{tmp_path / name} {says}"


def test_torchscript_and_torch_export_archives_say_how_to_save_a_state_dict(tmp_path):
    t = torch_reference.build("resnet18_cifar", num_classes=10, width=8)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(t.eval(), torch.zeros(1, 3, 32, 32)), path)
    with pytest.raises(UserError) as e:
        converters.from_torch(path)
    assert str(e.value) == (f"{path} is a TorchScript archive (torch.jit.save): it holds a "
                            f"program, not a state dict; save its weights with torch.save("
                            f"torch.jit.load('{path}').state_dict(), 'weights.pth') and give "
                            f"that file")
    path = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(t.eval(), (torch.zeros(1, 3, 32, 32),)), path)
    with pytest.raises(UserError, match=r"is a torch.export program \(torch.export.save\); "
                                         r"save its weights with torch.save\(torch.export.load"):
        converters.from_torch(path)
