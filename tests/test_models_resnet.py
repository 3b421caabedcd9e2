"""ResNet-18 (torchvision layout and EASIER's CIFAR stem): parity, site order, round trip."""
import numpy as np
import pytest
import torch

import converters
import jaxprune
import models
from tests.torch_ref import images, jax_logits, max_diff, randomize, torch_logits, torchvision


def torch_resnet18(cifar: bool, num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    t = torchvision().models.resnet18(num_classes=num_classes)
    if cifar:  # EASIER's CIFAR ResNet-18: 3x3 stride-1 stem, maxpool kept
        t.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    return randomize(t, seed)


class TwoReluBlock(torch.nn.Module):
    """torchvision BasicBlock with its shared ReLU split into relu1 and relu2 (the paper's count)."""

    def __init__(self, block, identity1: bool, identity2: bool):
        super().__init__()
        self.b = block
        self.relu1 = torch.nn.Identity() if identity1 else torch.nn.ReLU()
        self.relu2 = torch.nn.Identity() if identity2 else torch.nn.ReLU()

    def forward(self, x):
        b = self.b
        out = self.relu1(b.bn1(b.conv1(x)))
        out = b.bn2(b.conv2(out))
        shortcut = b.downsample(x) if b.downsample is not None else x
        return self.relu2(out + shortcut)


def torch_with_identity(t: torch.nn.Module, site_index: int) -> torch.nn.Module:
    """The torch ResNet with its site_index-th activation (stem = 0) replaced by identity."""
    if site_index == 0:
        t.relu = torch.nn.Identity()
    k = 1
    for layer in (t.layer1, t.layer2, t.layer3, t.layer4):
        for i in range(len(layer)):
            layer[i] = TwoReluBlock(layer[i], site_index == k, site_index == k + 1)
            k += 2
    return t


@pytest.fixture(scope="module")
def cifar_pair():
    t = torch_resnet18(cifar=True)
    return t, converters.from_torch(t)


@pytest.mark.parametrize("cifar,sizes", [(True, (32, 33)), (False, (224, 97))])
def test_parity_with_torchvision(cifar, sizes):
    t = torch_resnet18(cifar)
    m = converters.from_torch(t)
    assert m.spec.arch == ("resnet18_cifar" if cifar else "resnet18")
    for size in sizes:
        x = images(2, size)
        err = max_diff(torch_logits(t, x), jax_logits(m, x))
        assert err <= 1e-4, f"size {size}: max |dlogits| {err}"


def test_site_names_and_count(cifar_pair):
    _, m = cifar_pair
    names = jaxprune.sites(m)
    assert len(names) == models.entry("resnet18_cifar").sites == 17
    assert names[:3] == ["relu", "layer1.0.relu1", "layer1.0.relu2"]
    assert names[-1] == "layer4.1.relu2"


@pytest.mark.parametrize("index", [0, 1, 2, 9, 16])
def test_linearizing_site_i_matches_torch_identity_at_i(index):
    t = torch_resnet18(cifar=True, seed=index)
    m = converters.from_torch(t)
    jaxprune.linearize(m, [jaxprune.sites(m)[index]])
    assert jaxprune.linearized(m) == [jaxprune.sites(m)[index]]
    x = images(2, 32, seed=index)
    ref = torch_logits(torch_with_identity(t, index), x)
    assert max_diff(ref, jax_logits(m, x)) <= 1e-4
    # and it really changed the function (the check could not pass by accident)
    assert max_diff(torch_logits(torch_resnet18(cifar=True, seed=index), x), ref) > 1e-3


@pytest.mark.parametrize("arch", ["resnet18_cifar", "resnet18"])
def test_state_dict_round_trip_is_bit_identical(arch):
    t = torch_resnet18(cifar=arch == "resnet18_cifar")
    ref = {k: v.numpy() for k, v in t.state_dict().items() if not k.endswith("num_batches_tracked")}
    out = converters.torch_state_dict(converters.from_torch(ref, arch=arch))
    assert set(out) == set(ref)
    for k in ref:
        assert out[k].dtype == ref[k].dtype and np.array_equal(out[k], ref[k]), k


def test_width_option_and_unknown_option():
    m = models.create("resnet18_cifar", num_classes=5, width=8)
    assert m.layers["fc"].kernel.value.shape == (64, 5)
    with pytest.raises(jaxprune.UserError, match="no option 'widht'"):
        models.create("resnet18_cifar", widht=8)
    with pytest.raises(jaxprune.UserError, match="resnet18_cifar"):
        models.create("resnet18_cifr")


def test_train_mode_matches_torch_and_updates_running_stats():
    """Train mode: batch statistics for the output, torch's momentum and unbiased running variance."""
    t = torch_resnet18(cifar=True)
    m = converters.from_torch(t)
    x = images(4, 32)
    t.train()
    m.train()
    with torch.no_grad():
        ref = t(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    out = np.asarray(m(x))
    assert max_diff(ref, out) <= 1e-4
    for name in ("bn1", "layer3.0.bn2"):
        tbn = t.get_submodule(name)
        assert max_diff(tbn.running_mean.numpy(), m.layers[name].mean.value) <= 1e-5
        assert max_diff(tbn.running_var.numpy(), m.layers[name].var.value) <= 1e-5


def test_fresh_weights_follow_torch_and_the_seed():
    """torchvision's init (conv: N(0, 2 / (k*k*out)); fc: U(±1/sqrt(in))), the same weights
    for the same seed, other weights for another; shapes alone draw nothing."""
    import jax
    from flax import nnx
    m = models.create("resnet18_cifar", num_classes=10, width=16, seed=3)
    conv = np.asarray(m.layers["layer3.0.conv2"].kernel.value)  # 3x3, 64 -> 64
    assert conv.dtype == np.float32 and abs(conv.std() / np.sqrt(2 / (9 * 64)) - 1) < 0.03
    fc = np.asarray(m.layers["fc"].kernel.value)
    bound = 1 / np.sqrt(fc.shape[0])
    assert np.abs(fc).max() <= bound and np.abs(fc).max() > 0.95 * bound
    same, other = (models.create("resnet18_cifar", num_classes=10, width=16, seed=s)
                   for s in (3, 4))
    leaves = [jax.tree.leaves(nnx.state(x, nnx.Param)) for x in (m, same, other)]
    assert all(np.array_equal(a, b) for a, b in zip(leaves[0], leaves[1]))
    assert not np.array_equal(conv, np.asarray(other.layers["layer3.0.conv2"].kernel.value))
    shapes = nnx.eval_shape(lambda: models.create("resnet18_cifar", num_classes=10, width=16))
    assert shapes.layers["layer3.0.conv2"].kernel.value.shape == conv.shape


# -- ResNet-34: the same builder, [3, 4, 6, 3] blocks ---------------------------------------

@pytest.fixture(scope="module")
def resnet34_pair():
    """torchvision's own resnet34 (fresh weights, BatchNorms made non-trivial) and its import."""
    torch.manual_seed(0)
    t = randomize(torchvision().models.resnet34(num_classes=10), seed=0)
    return t, converters.from_torch(t)


def test_resnet34_matches_torchvision(resnet34_pair):
    from converters.torch_reference import tolerance
    t, m = resnet34_pair
    assert m.spec.arch == "resnet34"   # recognised from the weights alone (no arch given)
    names = jaxprune.sites(m)
    assert len(names) == models.entry("resnet34").sites == 33
    assert names[-3:] == ["layer4.1.relu2", "layer4.2.relu1", "layer4.2.relu2"]
    for size in (64, 45):
        x = images(2, size)
        err = max_diff(torch_logits(t, x), jax_logits(m, x))
        assert err <= tolerance("resnet34"), f"size {size}: max |dlogits| {err}"


def test_resnet34_exports_torchvisions_state_dict(resnet34_pair):
    t, m = resnet34_pair
    ref = {k: v.numpy() for k, v in t.state_dict().items() if not k.endswith("num_batches_tracked")}
    out = converters.torch_state_dict(m)
    assert set(out) == set(ref)
    assert all(np.array_equal(out[k], ref[k]) for k in ref)
    back = converters.to_torchvision(m)     # loads strictly into torchvision's resnet34
    assert type(back) is type(t) and len(back.layer3) == 6


def test_resnet18_and_resnet34_weights_are_told_apart():
    r18 = {k: v.numpy() for k, v in torchvision().models.resnet18().state_dict().items()}
    with pytest.raises(jaxprune.UserError, match="are a 'resnet18' .*not a 'resnet34'"):
        converters.from_torch(r18, arch="resnet34")
