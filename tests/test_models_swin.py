"""Swin-T (torchvision layout): parity, site order, round trip, the Swin-specific layers.

One torch model and its conversion are shared by the module (Swin at 224 is
slow to run eagerly on a small CPU); every test that changes the converted
model puts it back.
"""
import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import converters
import jaxprune
import models
from models.layers import PatchMerging, ShiftedWindowAttention, StochasticDepth
from tests.torch_ref import images, jax_logits, max_diff, torch_logits, torchvision

NUM_CLASSES = 7
# (features index, block index) of the 12 blocks, in forward order
BLOCKS = [(stage, j) for stage, depth in ((1, 2), (3, 2), (5, 6), (7, 2)) for j in range(depth)]


def randomize_swin(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights that exercise every part of the forward, eval mode.

    torchvision's init (std 0.02 linears, zero biases, unit LayerNorms) leaves
    attention almost uniform and the relative position bias negligible, so a
    wrong window, mask or index could still pass; unit-variance linears, a
    std-1 bias table and random LayerNorm affines make each of them count.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / mod.in_features ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))
            if hasattr(mod, "relative_position_bias_table"):
                table = mod.relative_position_bias_table
                table.copy_(torch.randn(table.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    t = randomize_swin(torchvision().models.swin_t(num_classes=NUM_CLASSES))
    return t, converters.from_torch(t)


@pytest.mark.parametrize("size", [224, 100, 32])
def test_parity_with_torchvision(pair, size):
    """224 native; 100: odd maps (25, 13, 7) through padding and PatchMerging; 32: CIFAR,
    where later stages fit in one window and the shift is forced to 0."""
    t, m = pair
    assert m.spec.arch == "swin_t"
    x = images(1, size, seed=size)
    ref = torch_logits(t, x)
    err = max_diff(ref, jax_logits(m, x))
    print(f"swin_t {size}x{size}: max |dlogits| {err:.2e} (logit scale {np.abs(ref).max():.2f})")
    assert err <= 5e-4, f"size {size}: max |dlogits| {err}"


def test_site_names_and_count(pair):
    _, m = pair
    names = jaxprune.sites(m)
    assert len(names) == models.entry("swin_t").sites == 12
    assert names == [f"features.{s}.{j}.mlp.gelu" for s, j in BLOCKS]


def test_mlp_is_separate_nodes_around_the_site(pair):
    """Linear, GELU site, Dropout, Linear, Dropout in a chain: what a Linear-fusing merge needs."""
    _, m = pair
    order = [n for n, _ in m.graph]
    i = order.index("features.3.1.mlp.0")
    assert order[i:i + 5] == [f"features.3.1.mlp.{k}" for k in ("0", "gelu", "2", "3", "4")]
    assert dict(m.graph)["features.3.1.mlp.3"] == ("features.3.1.mlp.2",)


@pytest.mark.parametrize("index", [0, 4, 11])
def test_linearizing_site_i_matches_torch_identity_gelu(pair, index):
    t, m = pair
    stage, j = BLOCKS[index]
    name = jaxprune.sites(m)[index]
    ref_t = copy.deepcopy(t)
    ref_t.features[stage][j].mlp[1] = torch.nn.Identity()
    x = images(1, 32, seed=index)
    jaxprune.linearize(m, [name])
    try:
        assert jaxprune.linearized(m) == [name]
        ref = torch_logits(ref_t, x)
        assert max_diff(ref, jax_logits(m, x)) <= 5e-4
    finally:
        m.layers[name].mask.value = jnp.ones_like(m.layers[name].mask.value)
    # the check could not pass by accident: the site changes the function
    assert max_diff(torch_logits(t, x), ref) > 1e-3


def test_state_dict_round_trip_is_bit_identical(pair):
    t, _ = pair
    ref = {k: v.numpy() for k, v in t.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "features.5.3.attn.relative_position_index" in ref
    out = converters.torch_state_dict(converters.from_torch(ref))  # arch detected from the keys
    assert set(out) == set(ref)
    for k in ref:
        assert out[k].dtype == ref[k].dtype and np.array_equal(out[k], ref[k]), k
    # torch accepts the export as it is
    t2 = torchvision().models.swin_t(num_classes=NUM_CLASSES)
    t2.load_state_dict({k: torch.tensor(v) for k, v in out.items()}, strict=True)


def test_tampered_relative_position_index_is_refused(pair):
    t, _ = pair
    sd = {k: v.numpy().copy() for k, v in t.state_dict().items()}
    key = "features.5.2.attn.relative_position_index"
    sd[key] = sd[key][::-1].copy()
    with pytest.raises(jaxprune.UserError, match=key.replace(".", r"\.")):
        converters.from_torch(sd)


def test_window_size_is_detected_from_the_bias_table(pair):
    t, _ = pair
    sd = {k: v.numpy() for k, v in t.state_dict().items()}
    for k in [k for k in sd if k.endswith("relative_position_bias_table")]:
        sd[k] = np.zeros((7 * 7, sd[k].shape[1]), np.float32)  # (2*4-1)**2 rows: window 4
    assert models.detect(sd) == ("swin_t", {"num_classes": NUM_CLASSES, "window_size": 4})
    swin_s = dict(sd, **{"features.5.6.norm1.weight": sd["features.5.5.norm1.weight"]})
    with pytest.raises(jaxprune.UserError, match="could not recognise"):
        models.detect(swin_s)


def _torch_attention(dim, heads, window, shift, seed):
    torch.manual_seed(seed)
    swin = torchvision().models.swin_transformer
    attn = swin.ShiftedWindowAttention(dim, [window, window], [shift, shift], heads)
    return randomize_swin(attn, seed)


@pytest.mark.parametrize("hw,window,shift", [
    ((9, 13), 4, 2),   # padded to 12x16, shifted along both axes
    ((3, 13), 4, 2),   # the window covers H: shift forced to 0 there only
    ((5, 5), 7, 3),    # one window covers the map: no shift, no mask
    ((8, 8), 4, 0),    # plain windows, no padding
])
def test_window_attention_matches_torchvision(hw, window, shift):
    t = _torch_attention(16, 2, window, shift, seed=window + shift)
    layer = ShiftedWindowAttention(16, 2, window, shift, rngs=nnx.Rngs(0))
    layer.load_torch_state({k: v.numpy() for k, v in t.state_dict().items()}, "attn")
    x = np.random.default_rng(1).normal(size=(2, *hw, 16)).astype(np.float32)
    with torch.no_grad():
        ref = t(torch.from_numpy(x)).numpy()
    assert max_diff(ref, layer(jnp.asarray(x))) <= 1e-5


def test_patch_merging_order_and_odd_padding():
    swin = torchvision().models.swin_transformer
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    ref = swin._patch_merging_pad(torch.from_numpy(x)).numpy()
    out = np.asarray(PatchMerging()(jnp.asarray(x)))
    assert out.shape == (2, 3, 4, 12) and np.array_equal(out, ref)


def test_stochastic_depth_drops_whole_samples_in_train_mode_only(pair):
    layer = StochasticDepth(0.5, rngs=nnx.Rngs(0))
    x = jnp.ones((64, 2, 2, 3))
    y = np.asarray(layer(x))
    per_sample = y.reshape(64, -1)
    assert set(np.unique(per_sample)) == {0.0, 2.0}  # dropped, or kept and scaled by 1/(1-p)
    assert np.all(per_sample.min(1) == per_sample.max(1))  # one decision per sample
    layer.eval()
    assert np.array_equal(np.asarray(layer(x)), np.asarray(x))
    # in the model, the drop probability ramps 0 -> 0.2 over the 12 blocks and eval() switches it off
    _, m = pair
    probs = [m.layers[f"features.{s}.{j}.stochastic_depth1"].p for s, j in BLOCKS]
    assert probs[0] == 0.0 and probs[-1] == pytest.approx(0.2)
    m.train()
    try:
        assert not m.layers["features.7.1.stochastic_depth2"].deterministic
    finally:
        m.eval()
    assert m.layers["features.7.1.stochastic_depth2"].deterministic


@pytest.mark.parametrize("options,match", [
    ({"window_size": 0}, "window_size"),
    ({"window_size": (7, 7)}, "window_size"),
    ({"stochastic_depth_prob": 1.5}, "stochastic_depth_prob"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(jaxprune.UserError, match=match):
        models.create("swin_t", **options)
