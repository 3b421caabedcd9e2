"""`importance: finetune`, ECDC's importance table: the reference's keys, what one key
changes in the network, the normalisation, and a real table on the digits (each entry a
finetune), written as it goes and continued by a rerun."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import jaxprune
import models
from jaxprune import config
from jaxprune.context import RunContext, build_model
from jaxprune.methods.layermerge import finetune_importance as fi
from jaxprune.methods.layermerge.space import Edits, apply_edits, build_space
from models.net import randomize_bn

ROOT = Path(__file__).resolve().parents[1]
HW = (16, 16)


def _weights(m, name):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(m.layers[name], nnx.Param))]


def test_the_keys_are_the_references():
    """(1, 1) for every segment; (0, 1) from a block end, else (1, 0) to one; none from 0:
    ECDC's `exclude_zeros` set, 315 keys for MobileNetV2 (its released tables' count)."""
    mb = build_space(models.create("mobilenet_v2"))
    keys = fi.keys(mb)
    assert len(keys) == 315 and len(mb.segments) == 171
    assert (3, 5, 0, 1) not in keys  # 3 is not a block end
    assert {(2, 5, 0, 1), (2, 5, 1, 1), (3, 5, 1, 0), (0, 2, 1, 1)} <= set(keys)
    assert (0, 2, 1, 0) not in keys and (2, 5, 1, 0) not in keys
    r18 = build_space(models.create("resnet18_cifar", width=4))
    assert fi.keys(r18) == [(i, j, 1, 1) for i, j in r18.segments]


def test_layermerges_keys_are_its_options():
    """With layer dropping, one key per option of every segment (LayerMerge's 391 for
    MobileNetV2), its flags fixed: the original's at i, the space's at j (a ReLU6 after a
    block end closing two or more convs)."""
    mb = build_space(models.create("mobilenet_v2"), drop_layers=True)
    keys = fi.keys(mb)
    assert len(keys) == 391 == len(mb.entries())
    assert [k[:3] for k in keys] == list(mb.entries())
    free = set(mb.free_after)
    for i, j, _, ai, aj in keys:
        assert ai == (0 if i in free else 1)
        assert aj == (1 if j not in free or j - i >= 2 else 0)
    r18 = build_space(models.create("resnet18_cifar", width=4), drop_layers=True)
    assert [k[3:] for k in fi.keys(r18)] == [(1, 1)] * 30


def test_normalisation_is_ecdcs_single():
    delta = {(0, 1, 1, 1): -10.0, (1, 2, 1, 1): -20.0, (0, 2, 1, 1): -5.0}
    # the one-conv mean is -15: every entry gains 1.5 * 15
    assert fi.normalize(delta, 1.5) == {(0, 1, 1, 1): 12.5, (1, 2, 1, 1): 2.5,
                                        (0, 2, 1, 1): 17.5}


def test_a_key_changes_only_its_segment():
    """Inside the segment the activations go; a one-conv segment gets its conv and its
    BatchNorm re-initialised; MobileNetV2's block-end ReLU6 follows the key's flags."""
    m = randomize_bn(models.create("resnet18_cifar", num_classes=10, width=4))  # "trained"
    ms = build_space(m)
    probe = fi._Probe(m, ms, seed=0)
    probe.set((0, 2, 1, 1))   # layer1.0 whole: its relu1 goes
    off = [s for s in probe.m.sites() if float(probe.m.layers[s].mask.value) == 0]
    assert off == ["layer1.0.relu1"]
    probe.set((1, 2, 1, 1))   # layer1.0.conv2 alone: nothing linear, conv2 and bn2 fresh
    assert not [s for s in probe.m.sites() if float(probe.m.layers[s].mask.value) == 0]
    for name in ("layer1.0.conv2", "layer1.0.bn2"):
        assert all(np.array_equal(a, b) for a, b in
                   zip(_weights(probe.m, name), _weights(probe.fresh, name)))
        assert not all(np.array_equal(a, b) for a, b in
                       zip(_weights(probe.m, name), _weights(m, name)))
    for name in ("layer1.0.conv1", "layer1.0.bn1"):   # the rest is the original's
        assert all(np.array_equal(a, b) for a, b in
                   zip(_weights(probe.m, name), _weights(m, name)))
    probe.set((0, 2, 1, 1))   # the next key starts from the original again
    assert all(np.array_equal(a, b) for a, b in
               zip(_weights(probe.m, "layer1.0.conv2"), _weights(m, "layer1.0.conv2")))

    # with layer dropping, the key's option drops its convs: a network of its own
    lm = build_space(m, drop_layers=True)
    probe = fi._Probe(m, lm, seed=0)
    key = (0, 2, "k3s1d", 1, 1)               # layer1.0 as one 3x3 conv: one conv dropped
    dropped, = lm.dropped(*key[:3])
    assert probe.set(key) and dropped not in probe.m.layers
    assert [s for s in probe.m.sites() if float(probe.m.layers[s].mask.value) == 0] == [
        "layer1.0.relu1"]
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, *HW, 3)))
    want = apply_edits(nnx.clone(m), Edits(("layer1.0.relu1",), {}, (), (dropped,)))
    probe.m.eval()
    want.eval()
    np.testing.assert_allclose(probe.m(x), want(x), atol=1e-5)  # the plan's network
    assert probe.set((0, 2, "k5s1d", 1, 1)) and dropped in probe.m.layers  # none dropped
    net = probe.m
    assert not probe.set((1, 2, "k3s1d", 1, 1)) and probe.m is net  # the same convs: reset

    mb = models.create("mobilenet_v2_cifar", num_classes=10, width_mult=0.1)
    mbs = build_space(mb)
    probe = fi._Probe(mb, mbs, seed=0)
    probe.set((2, 5, 0, 1))
    act = {p: probe.m.layers[name] for p, name in probe.inserted.items()}
    assert float(act[2].mask.value) == 0 and float(act[5].mask.value) == 1
    assert all(float(a.mask.value) == 0 for p, a in act.items() if p not in (2, 5))
    probe.set((3, 5, 1, 0))
    assert all(float(a.mask.value) == 0 for a in act.values())


@pytest.mark.slow
def test_a_real_table_on_the_digits(tmp_path, monkeypatch):
    """22 finetunes of one epoch (one compiled step), each entry the validation accuracy
    minus the baseline, written to importance.json; a rerun reads them back and trains
    nothing; other settings are refused, naming the file. About 40 s on 2 cores."""
    cfg = config.load(ROOT / "configs/layermerge/digits.yaml",
                      [f"out={tmp_path}", "model.options={width: 4}", "method.pretrain_epochs=0",
                       "method.importance=finetune"])
    ctx = RunContext(cfg, tmp_path, 10)
    m = build_model(cfg, 10, HW)
    ms = build_space(m)
    imp, summary = fi.finetune_importance(ctx, m, ms, 10.0, epochs=1, alpha=1.6)
    saved = json.loads((tmp_path / fi.FILE).read_text())
    assert set(saved["delta"]) == {",".join(map(str, k)) for k in fi.keys(ms)}
    delta = {k: saved["delta"][",".join(map(str, k))] for k in fi.keys(ms)}
    assert all(-10.0 <= d <= 90.0 for d in delta.values())  # accuracies in [0, 100] - 10
    assert imp == pytest.approx(fi.normalize(delta, 1.6))
    assert summary["single_mean"] == pytest.approx(
        np.mean([d for (i, j, _, _), d in delta.items() if j == i + 1]))

    def no_training(*a, **k):
        raise AssertionError("a finished entry was trained again")
    monkeypatch.setattr(fi, "fit", no_training)
    again, _ = fi.finetune_importance(ctx, m, ms, 10.0, epochs=1, alpha=1.6)
    assert again == imp
    with pytest.raises(jaxprune.UserError, match=r"importance.json holds importance entries "
                                                 r"made with other settings \(epochs 1 "
                                                 r"\(here 2\)\): use a new run name"):
        fi.finetune_importance(ctx, m, ms, 10.0, epochs=2, alpha=1.6)
