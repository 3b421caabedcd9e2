"""jaxprune.merge: the fused model computes the linearized one, at every position.

Random weights and random BatchNorm statistics throughout (fresh BatchNorms are
identities and would hide a wrong fold). Tolerance: 1e-4 of the logits' scale.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune
import models
from jaxprune.errors import UserError
from jaxprune.merging import merge, profile
from models.layers import FusedConv
from models.layers import Act, Add, BatchNorm, Conv, Dropout, GlobalAvgPool, Linear
from models.net import GraphBuilder, ModelSpec, randomize_bn

TOL = 1e-4


def only(m, sites):
    """`m` with exactly `sites` linearized (the fixture's models are shared)."""
    for s in m.sites():
        m.layers[s].mask.value = jnp.ones(())
    return jaxprune.linearize(m, sites)


def images(hw, n=2, seed=1, c=3):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, *hw, c)), jnp.float32)


def logits(m, x):
    graphdef, state = nnx.split(m)
    return np.asarray(jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, x))


def check_exact(m, hw, cost="none"):
    """Merge `m` at `hw`; return (fused model, report) after checking the logits."""
    small, rep = merge(m, input_size=hw, cost=cost, verify=False, return_report=True)
    m.eval()
    x = images(hw)
    ref, got = logits(m, x), logits(small, x)
    scale = float(np.abs(ref).max())
    assert np.abs(got - ref).max() <= TOL * scale, (np.abs(got - ref).max(), scale)
    return small, rep


# -- small graphs that isolate the border trap, strides and groups -----------------------

def _net(build, hw=(13, 11), cin=3):
    b = GraphBuilder()
    build(b, nnx.Rngs(0))
    b.add("pool", GlobalAvgPool())
    b.add("fc", Linear(b_channels(b), 5, rngs=nnx.Rngs(1)))
    return randomize_bn(b.build(ModelSpec("test", 5, (), hw, cin)))


def b_channels(b):
    for name, _ in reversed(b.graph):
        layer = b.layers[name]
        for attr in ("cout", "num_features", "dout"):
            if hasattr(layer, attr):
                return getattr(layer, attr)
    raise AssertionError


def _identity_act(kind="relu"):
    a = Act(kind)
    a.mask.value = jnp.zeros(())
    return a


def test_padded_conv_pair_is_exact_at_the_border_where_plain_composition_is_not():
    # conv2 pads its input with zeros; a composed 5x5 kernel would instead see values
    # computed from real input there (DESIGN.md §7, the 1-D example of the issue).
    m = _net(_conv_pair)
    small, rep = check_exact(m, (13, 11))
    fused = small.layers["c1"]
    assert isinstance(fused, FusedConv) and fused.kernel_size == (5, 5)
    assert len(fused.border) > 0 and fused.edge_bias is not None
    assert rep.after.depth == rep.before.depth - 1
    # the composed kernel alone (with the interior bias) is wrong on the border ring only
    x = images((13, 11), c=3)
    exact = np.asarray(fused(x))
    naive = np.asarray(jax.lax.conv_general_dilated(
        x, fused.kernel.value, fused.stride, fused.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + fused.bias.value)
    err = np.abs(naive - exact).max(axis=(0, 3))
    assert err[1:-1, 1:-1].max() < 1e-5 and err.max() > 1e-2


def test_pointwise_then_depthwise_needs_only_edge_biases():
    # MobileNetV2: 1x1 expand (no padding) -> 3x3 depthwise -> 1x1 project. Only the BN
    # shift is wrong at the border, so the linear part has no corrections.
    def build(b, rngs):
        _strided_inverted_residual(b, rngs)
        b.add("a3", Act("relu6"))
    for hw in ((13, 11), (16, 16)):
        small, _ = check_exact(_net(build, hw), hw)
        fused = small.layers["e"]
        assert isinstance(fused, FusedConv)
        assert fused.kernel_size == (3, 3) and fused.stride == (2, 2) and fused.groups == 1
        assert fused.edge_bias is not None and len(fused.border) == 0


def test_strided_grouped_chain_with_a_projected_residual():
    def build(b, rngs):
        b.add("stem", Conv(3, 8, 3, padding=1, rngs=rngs))
        b.add("stem_act", Act("relu"))
        b.add("c1", Conv(8, 8, 3, stride=2, padding=1, groups=2, rngs=rngs))
        b.add("bn1", BatchNorm(8))
        b.add("a1", _identity_act())
        b.add("dw", Conv(8, 8, 5, padding=2, groups=8, rngs=rngs))
        b.add("bn2", BatchNorm(8))
        b.add("drop", Dropout(0.5, rngs=rngs))
        main = b.add("pw", Conv(8, 8, 1, groups=4, rngs=rngs))
        b.add("short", Conv(8, 8, 1, stride=2, rngs=rngs), inputs="stem_act")
        short = b.add("short_bn", BatchNorm(8))
        b.add("add", Add(), inputs=(main, short))
        b.add("out_act", Act("relu"))
    for hw in ((13, 11), (12, 17)):
        small, rep = check_exact(_net(build, hw), hw)
        fused = small.layers["c1"]
        assert fused.stride == (2, 2) and fused.kernel_size == (11, 11)
        assert "short" not in small.layers and "add" not in small.layers
        assert (rep.before.depth, rep.after.depth) == (5, 3)  # stem, fused conv, fc


def test_grouped_pair_stays_grouped():
    def build(b, rngs):
        b.add("c1", Conv(3, 6, 1, rngs=rngs))
        b.add("a0", Act("relu"))
        b.add("g1", Conv(6, 6, 3, padding=1, groups=3, rngs=rngs))
        b.add("a1", _identity_act())
        b.add("g2", Conv(6, 6, 3, padding=1, groups=3, rngs=rngs))
        b.add("a2", Act("relu"))
    small, _ = check_exact(_net(build), (13, 11))
    assert small.layers["g1"].groups == 3


def test_linear_pair_on_tokens_becomes_one_linear():
    def build(b, rngs):
        b.add("c", Conv(3, 8, 2, stride=2, bias=True, rngs=rngs))
        b.add("norm", Act("gelu"))
        b.add("fc1", Linear(8, 32, rngs=rngs))
        b.add("gelu", _identity_act("gelu"))
        b.add("drop", Dropout(0.1, rngs=rngs))
        b.add("fc2", Linear(32, 8, rngs=rngs))
        b.add("act", Act("gelu"))
    small, rep = check_exact(_net(build, (8, 8)), (8, 8), cost="macs")
    assert isinstance(small.layers["fc1"], Linear) and small.layers["fc1"].dout == 8
    assert rep.after.macs < rep.before.macs


def test_partial_masks_stay_nonlinear_and_bn_alone_is_not_fused():
    def build(b, rngs):
        b.add("c1", Conv(3, 4, 3, padding=1, rngs=rngs))
        b.add("snl", Act("relu"))
        b.add("bn", BatchNorm(4))
        b.add("a", Act("relu"))
    m = _net(build)
    m.layers["snl"].mask.value = jnp.asarray([1.0, 0.0, 1.0, 0.0])  # per channel (SNL)
    small, rep = check_exact(m, (13, 11))
    assert isinstance(small.layers["snl"], Act) and isinstance(small.layers["bn"], BatchNorm)
    assert rep.after.depth == rep.before.depth


def _conv_pair(b, rngs):
    b.add("c1", Conv(3, 4, 3, padding=1, rngs=rngs))
    b.add("bn1", BatchNorm(4))
    b.add("a1", _identity_act())
    b.add("c2", Conv(4, 4, 3, padding=1, rngs=rngs))
    b.add("bn2", BatchNorm(4))
    b.add("a2", Act("relu"))


def _two_strides(b, rngs):
    # total stride 4: which last rows reach padding depends on the size modulo 4
    b.add("c1", Conv(3, 4, 3, stride=2, padding=1, rngs=rngs))
    b.add("bn1", BatchNorm(4))
    b.add("a1", _identity_act())
    b.add("c2", Conv(4, 4, 3, stride=2, padding=1, groups=2, rngs=rngs))
    b.add("bn2", BatchNorm(4))
    b.add("a2", _identity_act())
    b.add("c3", Conv(4, 4, 3, padding=1, rngs=rngs))
    b.add("a3", Act("relu"))


def _odd_strides(b, rngs):
    # strides 3 and 2, asymmetric padding, a bias before a crop-padded conv
    b.add("c0", Conv(3, 4, 1, bias=True, rngs=rngs))
    b.add("a0", _identity_act())
    b.add("c1", Conv(4, 4, 5, stride=3, padding=((2, 1), (1, 2)), rngs=rngs))
    b.add("bn1", BatchNorm(4))
    b.add("a1", _identity_act())
    b.add("c2", Conv(4, 4, 2, stride=2, padding=((0, 1), (1, 0)), rngs=rngs))
    b.add("a2", Act("relu"))


def _strided_inverted_residual(b, rngs) -> str:
    """MobileNetV2's stride-2 block, linearized: 1x1 expand, 3x3/2 depthwise, 1x1
    project; returns its last layer."""
    b.add("e", Conv(3, 12, 1, rngs=rngs))
    b.add("bn1", BatchNorm(12))
    b.add("a1", _identity_act("relu6"))
    b.add("dw", Conv(12, 12, 3, stride=2, padding=1, groups=12, rngs=rngs))
    b.add("bn2", BatchNorm(12))
    b.add("a2", _identity_act("relu6"))
    b.add("p", Conv(12, 6, 1, rngs=rngs))
    return b.add("bn3", BatchNorm(6))


def _inverted_residual(b, rngs):
    # MobileNetV2's stride-2 block: only edge biases; then a stride-1 one with its residual
    p = _strided_inverted_residual(b, rngs)
    b.add("e2", Conv(6, 12, 1, rngs=rngs))
    b.add("bn4", BatchNorm(12))
    b.add("a4", _identity_act("relu6"))
    b.add("dw2", Conv(12, 12, 5, padding=2, groups=12, rngs=rngs))
    b.add("bn5", BatchNorm(12))
    b.add("a5", _identity_act("relu6"))
    b.add("p2", Conv(12, 6, 1, rngs=rngs))
    q = b.add("bn6", BatchNorm(6))
    b.add("add", Add(), inputs=(p, q))
    b.add("a6", Act("relu6"))


def _new_kinds(b, rngs):
    # a layer scale folds into its run; a dilated conv, an average pool, a gate product and
    # a concatenation end runs and stay
    from models.layers import AvgPool, Concat, Mul, Scale
    b.add("c1", Conv(3, 4, 3, padding=1, bias=True, rngs=rngs))
    b.add("a1", _identity_act())
    s = b.add("ls", Scale(4))
    b.layers["ls"].scale.value = jnp.asarray(np.random.default_rng(3).uniform(0.5, 2.0, 4), jnp.float32)
    b.add("c2", Conv(4, 4, 3, padding=1, rngs=rngs))
    b.add("bn2", BatchNorm(4))
    b.add("a2", _identity_act())
    d = b.add("dil", Conv(4, 4, 3, padding=2, dilation=2, rngs=rngs))
    b.add("a3", _identity_act())
    b.add("avg", AvgPool(3, 1, 1, count_include_pad=False))
    b.add("a4", _identity_act())
    p = b.add("c4", Conv(4, 4, 1, rngs=rngs))
    g = b.add("gate", Act("sigmoid"), inputs=(d,))
    m = b.add("mul", Mul(), inputs=(p, g))
    b.add("cat", Concat(), inputs=(m, s))
    b.add("c5", Conv(8, 4, 3, padding=1, rngs=rngs))
    b.add("a5", _identity_act())
    b.add("ls2", Scale(4))
    b.layers["ls2"].scale.value = jnp.asarray(np.random.default_rng(4).uniform(0.5, 2.0, 4),
                                              jnp.float32)
    b.add("c6", Conv(4, 4, 3, padding=1, rngs=rngs))
    b.add("a6", Act("relu"))


def test_new_layer_kinds_fold_or_end_runs_and_stay_exact():
    """Scale folds like a BatchNorm (into c1); the dilated conv, the
    average pool, the product and the concatenation stay as they are; exact at 13x11,
    an odd size and a larger one."""
    from models.layers import AvgPool, Concat, Mul
    m = _net(_new_kinds, (13, 11))
    small, rep = merge(m, input_size=(13, 11), cost="none", verify=False, return_report=True)
    kinds = {n: type(layer) for n, layer in small.named_layers()}
    # the scaled map is also read by the concatenation: the run ends there
    assert kinds["c1"] is Conv and "ls" not in kinds and "bn2" not in kinds
    assert kinds["dil"] is Conv and small.layers["dil"].dilation == (2, 2)
    assert (kinds["avg"], kinds["mul"], kinds["cat"]) == (AvgPool, Mul, Concat)
    assert kinds["c5"] is FusedConv and "ls2" not in kinds and "c6" not in kinds
    m.eval()
    for hw in ((13, 11), (17, 19), (40, 37)):
        x = images(hw)
        ref = logits(m, x)
        assert np.abs(logits(small, x) - ref).max() <= TOL * np.abs(ref).max(), hw


SMALL_GRAPHS = {"pair": _conv_pair, "two_strides": _two_strides, "odd_strides": _odd_strides,
                "inverted_residual": _inverted_residual}


@pytest.mark.parametrize("name", list(SMALL_GRAPHS))
def test_one_fused_layer_is_exact_at_every_size_from_its_smallest(name):
    """Merged once, at 13x11; exact from the smallest size it names on, at sizes of every
    residue modulo the stride on both axes, and at a larger one; smaller sizes refused."""
    m = _net(SMALL_GRAPHS[name], (13, 11))
    small, rep = merge(m, input_size=(13, 11), cost="none", verify=False, return_report=True)
    assert [type(layer) for _, layer in small.named_layers()].count(FusedConv) == 1
    assert rep.input_sizes["kind"] == "min"
    h0, w0 = rep.input_sizes["size"]
    assert h0 <= 13 and w0 <= 11
    s = max(next(layer for _, layer in small.named_layers() if isinstance(layer, FusedConv)).stride)
    m.eval()
    for hw in [(h0 + k, w0 + s - 1 - k) for k in range(s)] + [(13, 11), (40, 37)]:
        x = images(hw)
        ref = logits(m, x)
        assert np.abs(logits(small, x) - ref).max() <= TOL * np.abs(ref).max(), hw
    for hw in ((h0 - 1, w0), (h0, w0 - 1)):
        if min(hw) >= 1:
            with pytest.raises(UserError, match=rf"runs at inputs of at least {h0}x{w0}, got "
                                                rf".*jaxprune.merge\(m, input_size=\(H, W\)\)"):
                small(images(hw))


def test_fixed_size_merge_is_exact_there_refuses_other_sizes_and_stores_less():
    m = _net(_two_strides, (13, 11))
    agnostic, rep = merge(m, input_size=(13, 11), cost="none", return_report=True)
    fixed, rep_fixed = merge(m, input_size=(13, 11), cost="none", fixed_size=True,
                             return_report=True)
    assert rep_fixed.max_abs_diff <= TOL * rep_fixed.logit_scale
    assert rep_fixed.input_sizes == {"kind": "fixed", "size": [13, 11],
                                     "why": "merged with fixed_size=True"}
    # the other residues' border terms are what the size-agnostic layer stores on top
    assert 0 < rep_fixed.after.border_params < rep.after.border_params
    assert 0 < rep_fixed.after.border_macs <= rep.after.border_macs
    with pytest.raises(UserError, match=r"fused for 13x11 inputs.*input_size=\(H, W\)"):
        fixed(images((14, 11)))


def test_a_kernel_wider_than_the_map_makes_the_layer_fixed_and_says_why():
    # merged at 5x5: the fused 15x15/4 layer needs larger maps for border terms that hold at
    # every size, so the model is made for 5x5 only
    m = _net(_two_strides, (5, 5))
    small, rep = check_exact(m, (5, 5))
    assert rep.input_sizes["kind"] == "fixed" and "c1 is exact at every size only from "\
        "inputs of" in rep.input_sizes["why"]
    with pytest.raises(UserError, match="fused for 5x5 inputs"):
        small(images((6, 6)))


# -- the memory a composition needs ---------------------------------------------------------

def _classifier(widths=(512, 2048, 2048, 10)) -> models.Net:
    """conv, ReLU, pool, then Linear layers of `widths` with identities between them."""
    b = GraphBuilder()
    b.add("conv", Conv(3, widths[0], 3, padding=1, rngs=nnx.Rngs(0)))
    b.add("relu", Act("relu"))
    b.add("pool", GlobalAvgPool())
    for i, (din, dout) in enumerate(zip(widths, widths[1:])):
        if i:
            b.add(f"act{i}", _identity_act())
        b.add(f"fc{i}", Linear(din, dout, rngs=nnx.Rngs(i)))
    return b.build(ModelSpec("test", widths[-1], (), (4, 4), 3))


def test_a_linear_chain_needs_the_memory_of_its_factors_and_a_refusal_quotes_it(monkeypatch):
    """512->2048->2048->10 is composed from its factors (float64): 8 * (512*2048 + 2048*2048
    + 2048*10) bytes, plus the 512x10 product, 40.2 MiB, not the square of its input. Under
    a lower limit it is kept, and the report quotes that size."""
    from jaxprune.merging import fuse
    from jaxprune.merging.affine import DenseMap
    need = 8 * (512 * 2048 + 2048 * 2048 + 2048 * 10) + 8 * 512 * 10
    geometry = DenseMap.identity(512, weights=False)
    for dout in (2048, 2048, 10):
        geometry = geometry.linear(None, dout)
    assert geometry.peak_bytes + geometry.product_bytes == need
    small, rep = check_exact(_classifier(), (4, 4))
    assert [n for n, layer in small.named_layers() if isinstance(layer, Linear)] == ["fc0"]
    assert small.layers["fc0"].din == 512 and small.layers["fc0"].dout == 10
    monkeypatch.setattr(fuse, "_COMPOSE_BYTES", 32 * 2**20)
    kept = merge(_classifier(), input_size=(4, 4), cost="none", return_report=True)[1]
    assert kept.as_dict()["skipped"][-1]["reason"] == (
        f"not one layer: composing it exactly would need {need / 2**20:.1f} MiB (limit 32.0 MiB)")


@pytest.mark.slow
def test_vgg_classifier_with_both_relus_linear_becomes_one_linear():
    """VGG-16-BN at 32x32 with classifier.1 and classifier.4 linearized: the classifier
    (25088->4096->4096->10) is one Linear 25088->10; depth 16 -> 14, 134.3 M -> 15.0 M
    parameters. Composed from its factors it needs about 1 GiB, under the 2 GiB limit."""
    m = models.create("vgg16_bn", num_classes=10)
    jaxprune.linearize(m, ["classifier.1", "classifier.4"])
    small, rep = merge(m, input_size=(32, 32), cost="none", return_report=True)
    linears = [layer for _, layer in small.named_layers() if isinstance(layer, Linear)]
    assert [(lin.din, lin.dout) for lin in linears] == [(25088, 10)]
    assert (rep.before.depth, rep.after.depth) == (16, 14)
    assert rep.after.params == 14_965_578 and rep.max_abs_diff <= 1e-4 * rep.logit_scale


# -- every model family ------------------------------------------------------------------

def _gates(*indices):
    """The sites of these DepthShrinker gates (whole inverted residuals, linearized)."""
    def sites(m):
        from jaxprune.methods.depthshrinker.groups import groups
        g = groups(m)
        return [s for i in indices for s in g[i].sites]
    return sites


FAMILIES = {
    # arch, options, sizes (native first where cheap), patterns: single site, blocks, all
    "resnet18_cifar": (dict(width=8), [(32, 32), (35, 33)],
                       [["layer2.0.relu1"],
                        lambda m: [s for s in m.sites() if s.startswith(("layer1.", "layer3.0."))],
                        lambda m: m.sites()]),
    "resnet18": (dict(width=8), [(67, 61)], [["layer1.1.relu1"], lambda m: m.sites()]),
    "mobilenet_v2_cifar": (dict(width_mult=0.35), [(32, 32), (33, 35)],
                           [["features.5.act_dw"], _gates(2, 3, 9), lambda m: m.sites()]),
    "mobilenet_v2": (dict(width_mult=0.35, layout="timm"), [(35, 37)],
                     [["blocks.2.1.bn2.act"], lambda m: m.sites()]),
    # 5x5 depthwise blocks (gates 4, 5: blocks.2.x; 9: blocks.4.0) and a stride-2 one
    "efficientnet_lite0": ({}, [(65, 67)], [["blocks.2.0.bn2.act"], _gates(2, 4, 5, 9)]),
    "vgg16_bn": ({}, [(33, 35)], [["features.2"], ["features.36", "classifier.1", "classifier.4"],
                                  lambda m: m.sites()]),
    "swin_t": ({}, [(61, 67)], [["features.1.0.mlp.gelu"], lambda m: m.sites()]),
}
# Fusing a whole network composes kernels as wide as the map with many border classes:
# exact, but tens of seconds per case, so those run with the slow tests, and only at the
# family's last size (the odd one: more border classes than the native size).
CASES = [pytest.param(arch, hw, k, id=f"{arch}-{hw[0]}x{hw[1]}-p{k}",
                      marks=[pytest.mark.slow] if k == len(pats) - 1 else [])
         for arch, (_, sizes, pats) in FAMILIES.items() for hw in sizes for k in range(len(pats))
         if k < len(pats) - 1 or hw == sizes[-1]]


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = randomize_bn(models.create(arch, num_classes=10, **FAMILIES[arch][0]))
        return cache[arch]
    return get


@pytest.mark.parametrize("arch,hw,k", CASES)
def test_fused_equals_linearized(built, arch, hw, k):
    m = built(arch)
    pattern = FAMILIES[arch][2][k]
    only(m, pattern(m) if callable(pattern) else pattern)
    small, rep = check_exact(m, hw)
    assert rep.after.depth < rep.before.depth  # every pattern here leaves a fusable run
    assert rep.input_size == hw and small.spec.input_size == hw
    assert dict(small.spec.options)["fused"] is True


# Merged once at the native size, then run at the native size, an odd one, a larger one
# and the smallest the fused model names. Residual blocks folded whole (identity and
# strided projection), strided and depthwise inverted residuals, 5x5 depthwise blocks.
ANY_SIZE = {
    "resnet18_cifar": (lambda m: [s for s in m.sites() if s.startswith(
        ("layer1.0.", "layer2.0.", "layer3.0.relu1"))], [(35, 33), (320, 288)]),
    "resnet18": (lambda m: [s for s in m.sites() if s.startswith(("layer1.1.", "layer2.0."))],
                 [(227, 229), (320, 288)]),
    "mobilenet_v2_cifar": (_gates(3, 4, 9), [(33, 35), (320, 288)]),
    "mobilenet_v2": (_gates(2, 4, 7), [(227, 229), (320, 288)]),
    "efficientnet_lite0": (_gates(2, 4, 5, 9), [(227, 229), (320, 288)]),
    "vgg16_bn": (["features.2", "features.12", "classifier.1", "classifier.4"],
                 [(227, 229), (320, 288)]),
    "swin_t": (["features.1.0.mlp.gelu", "features.5.3.mlp.gelu"], [(229, 227), (384, 384)]),
}
EXPENSIVE = ("efficientnet_lite0", "vgg16_bn", "swin_t")  # full widths at 224 px and more


@pytest.mark.parametrize("arch", [pytest.param(a, marks=[pytest.mark.slow] if a in EXPENSIVE
                                               else []) for a in ANY_SIZE])
def test_fused_model_is_exact_at_every_size(built, arch):
    m = built(arch)
    pattern, sizes = ANY_SIZE[arch]
    only(m, pattern(m) if callable(pattern) else pattern)
    small, rep = merge(m, cost="none", verify=False, return_report=True)
    assert rep.after.depth < rep.before.depth
    kind = rep.input_sizes["kind"]
    assert kind == ("any" if arch == "swin_t" else "min"), rep.input_sizes
    smallest = [tuple(rep.input_sizes["size"])] if kind == "min" else []
    assert all(f["sizes"].startswith("any size") for f in rep.fused)
    m.eval()
    for hw in [tuple(m.spec.input_size), *sizes, *smallest]:
        x = images(hw)
        ref, got = logits(m, x), logits(small, x)
        assert np.abs(got - ref).max() <= TOL * np.abs(ref).max(), hw
    if smallest:
        h0, w0 = smallest[0]
        with pytest.raises(UserError, match=f"runs at inputs of at least {h0}x{w0}"):
            small(images((h0 - 1, w0)))


@pytest.mark.parametrize("arch", ["resnet18_cifar", "mobilenet_v2_cifar"])
def test_default_cost_model_is_exact_and_never_adds_work(built, arch):
    m = only(built(arch), built(arch).sites()[::2])
    small, rep = check_exact(m, (32, 32), cost="macs")
    assert rep.after.macs <= rep.before.macs


def test_cost_model_skips_resnet_block_fusion_and_says_why(built):
    m = only(built("resnet18_cifar"), ["layer1.0.relu1"])
    small, rep = check_exact(m, (32, 32), cost="macs")
    assert rep.after.depth == rep.before.depth  # a 5x5 conv: +39 % MACs, so kept
    reasons = [s for s in rep.skipped if s["run"][0] == "layer1.0.conv1"]
    assert reasons and "macs cost model" in reasons[0]["reason"]
    assert "layer1.0.conv1" in str(rep)
    forced, rep2 = check_exact(m, (32, 32), cost="none")
    assert rep2.after.depth == rep.before.depth - 1
    assert isinstance(forced.layers["layer1.0.conv1"], FusedConv)


@pytest.mark.slow  # times every candidate layer: a compile each
def test_latency_cost_model_times_candidates(built):
    m = only(built("mobilenet_v2_cifar"), ["features.3.act_expand", "features.3.act_dw"])
    small, rep = check_exact(m, (32, 32), cost="latency")
    assert rep.cost_model == "latency"


def _timed_by_kernel(wide_ms: float):
    """A stand-in for `_Planner.timed` (what `jaxprune.measure` would measure): 1 ms per
    layer, `wide_ms` for a layer with a kernel wider than 3 (a composed 3x3 pair)."""
    def timed(self):
        return {key: wide_ms if max(getattr(layer, "kernel_size", (1,))) > 3 else 1.0
                for key, (layer, _) in self.requests.items()}
    return timed


@pytest.mark.parametrize("wide_ms", [100.0, 0.5])
def test_latency_cost_model_fuses_a_run_only_where_it_measures_faster(built, monkeypatch,
                                                                     wide_ms):
    """A residual block with its inner ReLU linear fuses into one 5x5 layer only when that
    layer is timed faster than the block kept (conv+bn, conv+bn, add: 3 ms); kept, the
    report gives both measured times."""
    from jaxprune.merging import fuse
    monkeypatch.setattr(fuse._Planner, "timed", _timed_by_kernel(wide_ms))
    m = only(built("resnet18_cifar"), ["layer1.0.relu1"])
    small, rep = check_exact(m, (32, 32), cost="latency")
    kept = [s for s in rep.skipped if s["run"][0] == "layer1.0.conv1"]
    if wide_ms > 3.0:
        assert not isinstance(small.layers["layer1.0.conv1"], FusedConv)
        assert small.layers["layer1.0.conv1"].kernel_size == (3, 3)
        assert [s["ms"] for s in kept] == [{"fused": 100.0, "chosen": 3.0}]
        assert ("kept layer1.0.conv1 .. layer1.0.add: fused whole it would cost 100.000 ms per "
                "batch of 1, as chosen 3.000 ms per batch of 1 (latency cost model)") in str(rep)
    else:
        assert not kept and small.layers["layer1.0.conv1"].kernel_size == (5, 5)
    assert rep.after.depth == rep.before.depth - (wide_ms < 3.0)


def test_fold_only_cuts_leave_every_run_unfused(built):
    """`merge` under `fold_only_cuts`: every BatchNorm folded and every identity site gone,
    but no two weight layers composed (without the cuts, "none" fuses layer1.0 into a 5x5:
    test_cost_model_skips_resnet_block_fusion_and_says_why)."""
    from jaxprune.merging.fuse import fold_only_cuts
    m = only(built("resnet18_cifar"), ["layer1.0.relu1", "layer2.1.relu2"])
    small, rep = merge(m, input_size=(32, 32), cost="none", cuts=fold_only_cuts(m),
                       verify=True, return_report=True)
    assert rep.max_abs_diff <= TOL * rep.logit_scale
    assert rep.after.depth == rep.before.depth and rep.after.macs == rep.before.macs
    kinds = {type(layer).__name__ for layer in small.layers.values()}
    assert "BatchNorm" not in kinds and "FusedConv" not in kinds
    assert all(layer.kernel_size == (3, 3) or layer.kernel_size == (1, 1)
               for layer in small.layers.values() if isinstance(layer, Conv))
    assert not [n for n, layer in small.named_layers() if isinstance(layer, Act)
                and layer.linear_kind() == "identity"]


def test_report_dict_has_the_results_json_fields(built):
    m = only(built("resnet18_cifar"), [])
    _, rep = merge(m, cost="macs", return_report=True)
    d = rep.as_dict()
    assert 0 <= d["max_abs_diff"] <= TOL * d["logit_scale"]
    for key in ("depth_before", "depth_after", "params_before", "params_after", "macs_before",
                "macs_after", "max_abs_diff"):
        assert key in d
    # folding every BatchNorm: same depth, fewer parameters
    assert d["depth_after"] == d["depth_before"] and d["params_after"] < d["params_before"]


def test_bad_arguments(built):
    m = built("resnet18_cifar")
    with pytest.raises(UserError, match="cost model"):
        merge(m, cost="fast")
    with pytest.raises(UserError, match="input_shape"):
        profile(m, (0, 32))


# -- profile -----------------------------------------------------------------------------

def test_profile_matches_published_counts():
    p = profile(models.create("resnet18", num_classes=1000))
    assert p.depth == 18 and p.params == 11_689_512
    assert abs(p.macs - 1.814e9) / 1.814e9 < 0.01            # ResNet-18: 1.8 GMACs
    q = profile(models.create("mobilenet_v2", num_classes=1000))
    assert q.depth == 53 and q.params == 3_504_872
    assert abs(q.macs - 300.8e6) / 300.8e6 < 0.01            # MobileNetV2: 300 MMACs
    assert dict(q)["depth"] == 53                             # also a mapping


def test_profile_latency_when_asked():
    m = models.create("resnet18_cifar", num_classes=10, width=8)
    p = profile(m, (1, 32, 32, 3), latency=["jax", "torch"], batch=2, rounds=1, repeats=2)
    assert set(p.latency_ms) == set(p.latency_spread_ms) == {"jax@2", "torch@2"}
    assert min(p.latency_ms.values()) > 0
    with pytest.raises(UserError, match="runtime"):
        profile(m, latency="tf")
