"""VGG-16-BN, MobileNetV2 (torchvision, timm layout, CIFAR) and EfficientNet-Lite0 (timm)
against their torch originals."""
import functools

import numpy as np
import pytest
import torch

import converters
import jaxprune
import models
from jaxprune.errors import UserError
from jaxprune.methods.depthshrinker.groups import groups
from tests.torch_ref import images, jax_logits, max_diff, ready, timm, torch_logits, torchvision

TOL = 1e-4
NUM_CLASSES = 3


def _cifar_mbv2(**kw) -> torch.nn.Module:
    """EASIER's CIFAR MobileNetV2: torchvision's with stem and stage-2 strides set to 1."""
    tm = torchvision().models.mobilenet_v2(**kw)
    tm.features[0][0].stride = (1, 1)
    tm.features[2].conv[1][0].stride = (1, 1)  # first block of [6, 24, 2, 2]: its depthwise conv
    return tm


# name -> (torch factory, expected arch, expected options subset, parity sizes)
CASES = {
    "vgg16_bn": (lambda: torchvision().models.vgg16_bn(num_classes=NUM_CLASSES),
                 "vgg16_bn", {}, (224, 97, 32)),
    "mbv2_100": (lambda: torchvision().models.mobilenet_v2(num_classes=NUM_CLASSES),
                 "mobilenet_v2", {"width_mult": 1.0, "layout": "torchvision"}, (224, 97)),
    "mbv2_140": (lambda: torchvision().models.mobilenet_v2(num_classes=NUM_CLASSES, width_mult=1.4),
                 "mobilenet_v2", {"width_mult": 1.4, "layout": "torchvision"}, (224, 97)),
    "mbv2_cifar": (lambda: _cifar_mbv2(num_classes=NUM_CLASSES),
                   "mobilenet_v2_cifar", {"width_mult": 1.0, "layout": "torchvision"}, (32, 33)),
    "timm_140": (lambda: timm().create_model("mobilenetv2_140", num_classes=NUM_CLASSES),
                 "mobilenet_v2", {"width_mult": 1.4, "layout": "timm"}, (224, 97)),
    "lite0": (lambda: timm().create_model("efficientnet_lite0", num_classes=NUM_CLASSES),
              "efficientnet_lite0", {}, (224, 97)),
}


@functools.cache
def _pair(case: str):
    """(torch module, jaxprune model converted from the module), built once per case."""
    sizes = CASES[case][3]
    tm = ready(CASES[case][0](), seed=len(case), calib_size=min(sizes + (64,)))
    return tm, converters.from_torch(tm)


def _activations(tm: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute) of every activation module, in registration order, which
    in these models is also call order."""
    out = []
    for parent in tm.modules():
        for attr, child in parent.named_children():
            if isinstance(child, (torch.nn.ReLU, torch.nn.ReLU6)):
                out.append((parent, attr))
    return out


# the 224 px runs take most of this file's time
PARITY = [pytest.param(case, size, id=f"{case}-{size}",
                       marks=[pytest.mark.slow] if size >= 200 else [])
          for case, spec in CASES.items() for size in spec[3]]


@pytest.mark.parametrize("case,size", PARITY)
def test_parity(case, size):
    tm, m = _pair(case)
    _, arch, options, _ = CASES[case]
    assert m.spec.arch == arch
    assert options.items() <= dict(m.spec.options).items()
    x = images(1 if size >= 200 else 2, size, seed=size)
    ref = torch_logits(tm, x)
    diff = max_diff(ref, jax_logits(m, x))
    print(f"{case} {size}px: max |dlogits| = {diff:.2e} (logit scale {np.abs(ref).max():.2f})")
    assert diff <= TOL


SITE_CHECKS = [("vgg16_bn", i) for i in (0, 6, 12, 13, 14)] + \
              [("mbv2_100", i) for i in (0, 1, 2, 3, 18, 34)] + \
              [("mbv2_cifar", i) for i in (0, 4)] + [("timm_140", i) for i in (0, 1, 20, 34)] + \
              [("lite0", i) for i in (0, 1, 6, 32)]  # stem, DS block, a 5x5 depthwise, head


@pytest.mark.parametrize("case,index", SITE_CHECKS, ids=[f"{c}-{i}" for c, i in SITE_CHECKS])
def test_linearized_site_is_torch_identity(case, index):
    """Site i of the Flax model is the i-th activation call of the torch model."""
    tm, m = _pair(case)
    size = CASES[case][3][-1]  # the small odd / CIFAR size keeps this fast
    x = images(2, size, seed=index)
    site = jaxprune.sites(m)[index]
    before = jax_logits(m, x)
    parent, attr = _activations(tm)[index]
    act = getattr(parent, attr)
    setattr(parent, attr, torch.nn.Identity())
    try:
        ref = torch_logits(tm, x)
        jaxprune.linearize(m, [site])
        got = jax_logits(m, x)
    finally:
        setattr(parent, attr, act)
        m.layers[site].mask.value = np.ones((), np.float32)
    assert max_diff(ref, got) <= TOL, site
    assert max_diff(before, got) > 1e-3, f"linearizing {site} changed nothing"


@pytest.mark.parametrize("case", list(CASES))
def test_site_counts(case):
    tm, m = _pair(case)
    assert len(jaxprune.sites(m)) == models.entry(m.spec.arch).sites == len(_activations(tm))


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip(case):
    tm, _ = _pair(case)
    sd = {k: v.numpy() for k, v in tm.state_dict().items() if not k.endswith("num_batches_tracked")}
    arch = CASES[case][1] if case == "mbv2_cifar" else None  # its weights alone look like mobilenet_v2
    out = converters.torch_state_dict(converters.from_torch(sd, arch=arch))
    assert list(out) == list(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and np.array_equal(out[k], v), k


def test_cifar_variant_detection():
    tm, _ = _pair("mbv2_cifar")
    tv_module, _ = _pair("mbv2_100")
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    assert models.detect(sd)[0] == "mobilenet_v2"  # a state dict cannot show the strides
    assert models.detect(sd, tm)[0] == "mobilenet_v2_cifar"
    assert models.detect(sd, arch="mobilenet_v2_cifar")[0] == "mobilenet_v2_cifar"
    assert models.entry("mobilenet_v2").detect(sd, tm) is None
    assert models.entry("mobilenet_v2_cifar").detect(sd, tv_module) is None
    with pytest.raises(UserError, match="not a 'mobilenet_v2'"):
        converters.from_torch(tm, arch="mobilenet_v2")


def test_width_read_from_weights():
    tm = ready(torchvision().models.mobilenet_v2(num_classes=NUM_CLASSES, width_mult=0.5), seed=5,
                calib_size=64)
    m = converters.from_torch(tm)
    assert dict(m.spec.options)["width_mult"] == 0.5
    x = images(2, 64)
    assert max_diff(torch_logits(tm, x), jax_logits(m, x)) <= TOL


@pytest.mark.parametrize("case,n_blocks", [("timm_140", 17), ("mbv2_140", 17), ("lite0", 16)])
def test_blocks_and_depthshrinker_gates(case, n_blocks):
    """The blocks a model declares are the torch model's blocks (residual or not, chained);
    DepthShrinker's gates are the stem, one per block, the head: every site once, in order."""
    tm, m = _pair(case)
    blocks = models.blocks(m)
    if case == "mbv2_140":
        residual = [f.use_res_connect for f in tm.features[1:-1]]
    else:
        residual = [blk.has_skip for stage in tm.blocks for blk in stage]
    assert len(blocks) == n_blocks and [b.add is not None for b in blocks] == residual
    for prev, b in zip(blocks, blocks[1:]):
        assert b.input == prev.output
    assert all(b.output == b.add for b in blocks if b.add)
    gates = groups(m)
    assert len(gates) == n_blocks + 2
    assert [len(g.sites) for g in gates] == [1, 1] + [2] * (n_blocks - 1) + [1]
    assert [s for g in gates for s in g.sites] == jaxprune.sites(m)
    assert [g.block for g in gates] == [None] + [b.prefix for b in blocks] + [None]


def test_bad_options():
    with pytest.raises(UserError, match="layout"):
        models.create("mobilenet_v2", layout="keras")
    with pytest.raises(UserError, match="width_mult"):
        models.create("mobilenet_v2", width_mult=0.0)
    with pytest.raises(UserError, match=r"'resnet18_cifar' declares no blocks; models that do: "
                                         r"\['efficientnet_lite0', 'mobilenet_v2', "
                                         r"'mobilenet_v2_cifar'\]"):
        models.blocks(models.create("resnet18_cifar"))
