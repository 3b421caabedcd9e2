"""converters.to_torch / export / to_torchvision: the torch side computes the JAX model.

Dense, linearized (identity at removed sites) and fused models of every family;
the export folder round-trips through `converters.from_torch`, and `model.pt2`
runs in a fresh process that imports only torch.
"""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import converters
import jaxprune
import models
from jaxprune.errors import UserError
from jaxprune.merging import merge
from models.layers import Act, Layer
from models.net import randomize_bn

TOL = 1e-4


def images(hw, n=2, seed=3):
    return np.random.default_rng(seed).normal(size=(n, *hw, 3)).astype(np.float32)


def jax_logits(m, x):
    m.eval()
    graphdef, state = nnx.split(m)
    return np.asarray(jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, jnp.asarray(x)))


def torch_logits(module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def assert_close(got, ref):
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= TOL * max(1.0, float(np.abs(ref).max()))


FAMILIES = {  # arch: (options, input size, sites to linearize)
    "resnet18_cifar": (dict(width=8), (32, 32),
                       ["relu", "layer1.0.relu1", "layer2.0.relu1", "layer2.1.relu2"]),
    "mobilenet_v2_cifar": (dict(width_mult=0.35), (32, 32),
                           ["features.0.act", "features.2.act_expand", "features.2.act_dw"]),
    "mobilenet_v2": (dict(width_mult=0.35, layout="timm"), (35, 33),
                     ["bn1.act", "blocks.2.1.bn1.act", "blocks.2.1.bn2.act"]),
    "vgg16_bn": ({}, (32, 32), ["features.2", "features.5", "classifier.4"]),
    "swin_t": ({}, (64, 64), ["features.1.0.mlp.gelu", "features.5.3.mlp.gelu"]),
}


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(arch):
        if arch not in cache:
            opts, _, sites = FAMILIES[arch]
            dense = randomize_bn(models.create(arch, num_classes=10, **opts))
            lin = randomize_bn(models.create(arch, num_classes=10, **opts))
            jaxprune.linearize(lin, sites)
            cache[arch] = dense, lin
        return cache[arch]
    return get


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_to_torch_dense_linearized_fused(built, arch):
    dense, lin = built(arch)
    hw = FAMILIES[arch][1]
    x = images(hw)
    fused = merge(lin, input_size=hw, cost="none", verify=False)
    for m in (dense, lin, fused):
        assert_close(torch_logits(converters.to_torch(m), x), jax_logits(m, x))
    x = images((hw[0] + 5, hw[1] + 3))  # the fused model at another size
    assert_close(torch_logits(converters.to_torch(fused), x), jax_logits(lin, x))


@pytest.mark.parametrize("arch", ["resnet18_cifar", "mobilenet_v2_cifar", "mobilenet_v2",
                                  "vgg16_bn", "swin_t"])
def test_linearized_model_as_its_torchvision_architecture(built, tmp_path, arch):
    _, lin = built(arch)
    x = images(FAMILIES[arch][1])
    tv = converters.to_torchvision(lin)  # loads with strict=True
    assert_close(torch_logits(tv, x), jax_logits(lin, x))
    n_identity = sum(isinstance(mod, torch.nn.Identity) for mod in tv.modules())
    assert n_identity >= 1
    # the exported weights load strictly into that module as well
    from safetensors.torch import load_file
    converters.export(lin, tmp_path)
    tv.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)


def _fresh_process(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, cwd="/")
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("arch", ["resnet18_cifar", "mobilenet_v2_cifar"])
def test_export_round_trip_and_pt2_without_jaxprune(built, tmp_path, arch):
    """A fused export runs at its native size and at another one, from arch.json and in
    a process that imports only torch, where model.pt2 refuses inputs below its smallest."""
    _, lin = built(arch)
    hw = FAMILIES[arch][1]
    small = merge(lin, input_size=hw, cost="none", verify=False)
    assert small.input_sizes()[0] == "min"
    path = converters.export(small, tmp_path / "out")
    assert {p.name for p in path.iterdir()} >= {"model.safetensors", "arch.json", "model.pt2"}
    pt2 = json.loads((path / "arch.json").read_text())["pt2"]
    assert pt2["dynamic"] and pt2["min"] <= list(hw)
    back = converters.from_torch(path)
    for k, size in enumerate((hw, (hw[0] + 13, hw[1] + 6))):
        x = images(size, n=3)
        ref = jax_logits(lin, x)
        assert_close(jax_logits(back, x), ref)
        np.save(tmp_path / f"x{k}.npy", x.transpose(0, 3, 1, 2))
        np.save(tmp_path / f"ref{k}.npy", ref)
    h0, w0 = pt2["min"]
    got = _fresh_process(f"""
import sys, numpy as np, torch
module = torch.export.load({str(path / 'model.pt2')!r}).module()
out = []
with torch.no_grad():
    for k in (0, 1):
        x, ref = np.load({str(tmp_path)!r} + f"/x{{k}}.npy"), np.load({str(tmp_path)!r} + f"/ref{{k}}.npy")
        out.append(float(np.abs(module(torch.from_numpy(x)).numpy() - ref).max()))
        out.append(float(np.abs(module(torch.from_numpy(x[:1])).numpy() - ref[:1]).max()))
    try:
        module(torch.zeros(1, 3, {h0 - 1}, {w0}))
        refused = "no"
    except Exception as e:
        refused = "yes" if ">= {h0}" in str(e) else repr(str(e))
bad = [m for m in ("jaxprune", "jax", "models", "converters", "flax") if m in sys.modules]
print(*out, refused, bad)
""").split()
    assert all(float(d) <= TOL * 10 for d in got[:4]), got
    assert got[4:] == ["yes", "[]"], got


def test_arch_json_keeps_masks_and_edited_graphs(tmp_path):
    m = randomize_bn(models.create("resnet18_cifar", num_classes=10, width=8))
    m.layers["layer1.1.relu1"].mask.value = jnp.asarray([1.0, 0.0] * 4)  # per channel (SNL)
    jaxprune.linearize(m, ["layer3.0.relu2"])
    m.insert_after("layer2.1.add", "layer2.1.extra_act", Act("relu6"))  # an edited graph
    path = converters.export(m, tmp_path)
    arch = json.loads((path / "arch.json").read_text())
    assert arch["masks"]["layer3.0.relu2"] == 0.0 and len(arch["masks"]["layer1.1.relu1"]) == 8
    back = converters.from_torch(path)
    assert [n for n, _ in back.graph] == [n for n, _ in m.graph]
    x = images((32, 32))
    ref = jax_logits(m, x)
    assert_close(jax_logits(back, x), ref)
    assert_close(torch_logits(converters.to_torch(m), x), ref)
    with pytest.raises(UserError, match="graph differs"):
        converters.to_torchvision(m)


def test_refusals(built, tmp_path):
    _, lin = built("resnet18_cifar")
    small = merge(lin, input_size=(32, 32), cost="none", verify=False)
    with pytest.raises(UserError, match="fused model"):
        converters.to_torchvision(small)
    (kind, (h0, w0)) = small.input_sizes()
    assert kind == "min" and h0 <= 32
    tm = converters.to_torch(small)
    with pytest.raises(ValueError, match=f"runs at inputs of at least {h0}x{w0}, got "
                                         f"{h0 - 1}x{w0}"):
        with torch.no_grad():
            tm(torch.zeros(1, 3, h0 - 1, w0))
    fixed = merge(lin, input_size=(32, 32), cost="none", verify=False, fixed_size=True)
    with pytest.raises(ValueError, match="fused for 32x32 inputs, got 30x30"):
        with torch.no_grad():
            converters.to_torch(fixed)(torch.zeros(1, 3, 30, 30))

    class NoTorchSide(Layer):  # a complete declaration naming a counterpart nobody wrote
        torch_counterpart = "NoSuchModule"

        def __call__(self, x):
            return x

        def config(self):
            return {}

        def macs(self, in_shapes, out_shape):
            return 0

        def linear_kind(self):
            return "identity"

    m = models.create("resnet18_cifar", num_classes=10, width=8)
    m.insert_after("layer1.0.add", "odd", NoTorchSide())
    with pytest.raises(UserError, match=r"layer 'odd' is a NoTorchSide, whose torch counterpart "
                                         r"'NoSuchModule' is not defined"):
        converters.to_torch(m)
    with pytest.raises(UserError, match="NoSuchModule"):
        converters.export(m, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pt2_is_dynamic_where_the_graph_allows(built):
    from converters.torch_out import pt2_sizes
    _, lin = built("resnet18_cifar")
    fused = merge(lin, input_size=(32, 32), cost="none", verify=False)
    sizes = pt2_sizes(fused)
    # torch.export takes a dynamic size to be at least 2: every map is, from `min` on
    assert sizes["dynamic"] and list(fused.input_sizes()[1]) <= sizes["min"] <= [32, 32]
    fixed = merge(lin, input_size=(32, 32), cost="none", verify=False, fixed_size=True)
    assert pt2_sizes(fixed) == {"dynamic": False, "size": [32, 32],
                                "why": "the fused model is made for this input size only"}
    _, vgg = built("vgg16_bn")
    assert pt2_sizes(vgg)["why"] == ("torch.export traces layer 'avgpool' (AdaptiveAvgPool) "
                                     "at one input size")


def test_every_layer_kind_declares_what_the_passes_need():
    """One layer protocol: every kind has its torch counterpart; a kind that leaves out a
    declaration is refused where it is defined, naming what is missing."""
    from converters import torch_layers
    vocabulary = {n: k for n, k in Layer.kinds().items() if k.__module__.startswith("models.")}
    assert len(vocabulary) >= 15  # this test's own kinds aside
    for name, kind in vocabulary.items():
        assert callable(getattr(torch_layers, kind.torch_counterpart, None)), name
    with pytest.raises(TypeError, match=r"layer kind Half must declare macs, linear_kind, "
                                        r"torch_counterpart"):
        class Half(Layer):
            def config(self):
                return {}


@pytest.mark.parametrize("padding,stride", [(((1, 0), (2, 2)), (1, 1)), (((2, -1), (0, 1)), (2, 2)),
                                            (((0, 2), (1, 3)), (2, 3)), (((3, 1), (1, 1)), (3, 1))])
def test_torch_conv_with_fused_paddings(padding, stride):
    # fused convs have asymmetric or cropping (negative) padding; torch pads symmetrically
    from converters.torch_layers import Conv as TorchConv
    from models.layers import Conv
    layer = Conv(4, 6, (3, 2), stride=stride, padding=padding, groups=2, bias=True,
                 rngs=nnx.Rngs(0))
    layer.bias.value = jnp.arange(6.0)
    tconv = TorchConv(layer)
    tconv.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in layer.torch_state().items()})
    x = np.random.default_rng(0).normal(size=(2, 11, 10, 4)).astype(np.float32)
    with torch.no_grad():
        got = tconv(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    ref = np.asarray(layer(jnp.asarray(x)))
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-5
