"""SNL: mask shapes and ReLU counting, binarization under a budget, the search hooks in
the trainer (α trained, λ changed without a retrace), and the loop reaching a budget."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxprune
import models
from jaxprune import config
from jaxprune.config import TrainConfig
from jaxprune.methods.distillation import Distillation
from jaxprune.methods.snl.masks import (binarize, mask_shapes, relu_count, relu_weights,
                                        set_masks)
from jaxprune.methods.snl.method import SNLHooks
from jaxprune.train import Trainer, fetch, make_mesh


@pytest.fixture(scope="module")
def net():
    return models.create("resnet18_cifar", num_classes=10, width=4)


def test_mask_shapes_and_relu_weights(net):
    """Channel α: (C,), each covering H·W activations; pixel α: (H, W, C), one each."""
    ch = mask_shapes(net, (16, 16), "channel")
    px = mask_shapes(net, (16, 16), "pixel")
    assert list(ch) == net.sites() == list(px)
    # the stem is 3x3 stride 1 before the maxpool: 16x16 with width 4 channels
    assert ch["relu"] == (4,) and px["relu"] == (16, 16, 4)
    wc, wp = relu_weights(net, (16, 16), ch), relu_weights(net, (16, 16), px)
    assert wc["relu"] == 256 and set(wp.values()) == {1}
    ones_c = {s: np.ones(v) for s, v in ch.items()}
    ones_p = {s: np.ones(v) for s, v in px.items()}
    total = sum(int(np.prod(v)) for v in px.values())  # every activation of every site
    assert relu_count(ones_c, wc, 0.01) == relu_count(ones_p, wp, 0.01) == total
    with pytest.raises(jaxprune.UserError, match="granularity"):
        mask_shapes(net, (16, 16), "layer")


def test_binarize_respects_the_budget():
    alphas = {"a": np.array([0.9, 0.005, 0.5]), "b": np.array([0.3, 0.7])}
    weights = {"a": 10, "b": 4}  # activations per α
    assert relu_count(alphas, weights, 0.01) == 10 * 2 + 4 * 2
    masks, forced = binarize(alphas, weights, 0.01, budget=100)
    assert not forced
    np.testing.assert_array_equal(masks["a"], [1, 0, 1])
    np.testing.assert_array_equal(masks["b"], [1, 1])
    # a budget of 25: the largest α first while they fit (0.9 -> 10, 0.7 -> 14, 0.5 would be 24,
    # 0.3 -> 28 does not fit)
    masks, forced = binarize(alphas, weights, 0.01, budget=25)
    assert forced
    np.testing.assert_array_equal(masks["a"], [1, 0, 1])
    np.testing.assert_array_equal(masks["b"], [0, 1])
    assert relu_count(masks, weights, 0.5) == 24


@pytest.mark.parametrize("granularity", ["channel", "pixel"])
def test_search_hooks_train_alpha_without_retrace(net, granularity):
    m = nnx.clone(net)
    mesh = make_mesh()
    shapes = mask_shapes(m, (16, 16), granularity)
    alphas = {s: np.ones(v, np.float32) for s, v in shapes.items()}
    set_masks(m, alphas)
    distill = Distillation(net, temperature=4.0, kd_weight=1.0, ce_weight=1.0)
    hooks = SNLHooks(alphas, 1e-2, distill, scale=10.0)
    cfg = TrainConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant", epochs=1)
    trainer = Trainer(m, cfg, steps_per_epoch=3, mesh=mesh, hooks=hooks)
    trainer.start_round()
    rng = np.random.default_rng(0)
    sh = NamedSharding(mesh, P("data"))
    l1 = []
    for i in range(3):
        batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
                 "label": rng.integers(0, 10, 8).astype(np.int32), "mask": np.ones(8, np.float32)}
        trainer.train_step({k: jax.device_put(v, sh) for k, v in batch.items()})
        trainer.set_aux(lam=np.float32(1e-2 * 1.1 ** (i + 1)))
        l1.append(trainer.finish_epoch()["terms"]["l1"])
    assert trainer.traces["train"] == 1
    assert l1[0] > l1[1] > l1[2]
    # Adam moves each β by about lr a step (a little more when the gradient's size changes),
    # so each α by about scale * lr
    alpha = np.concatenate([a.ravel() for a in hooks.alpha(fetch(trainer.extra)).values()])
    assert np.abs(alpha - 1.0).max() <= 1.02 * 3 * 10 * 1e-3
    assert alpha.min() == pytest.approx(1.0 - 3 * 10 * 1e-3, abs=1e-3)
    trainer.sync_model()
    assert m.layers["relu"].mask.get_value().shape == shapes["relu"]


def test_snl_reaches_a_budget(tmp_path, untimed, dies_at_epoch_checkpoint):
    """The whole method on a narrow ResNet-18 at 16 px: λ grows until the ReLU count falls
    within 60 % of the network's, then the binarized masks are finetuned. Killed in the
    search and run again, it reports exactly the same."""
    from jaxprune import runner
    overrides = [
        "name=snl-test", "model.name=resnet18_cifar", "model.options={width: 4}",
        "data.batch_size=128", "data.image_size=16", "train.epochs=1", "train.lr=0.01",
        "method.name=snl", "method.relu_fraction=0.6", "method.lam=0.03",
        "method.lam_from_epoch=1", "method.search_epochs=12", "method.alpha_lr_scale=50"]
    _, res = runner.run(config.load(None, [f"out={tmp_path}", *overrides]))
    s, f = res["search"], res["finetune"]
    assert s["reached"] and s["relus"] <= res["budget"] == int(0.6 * res["relus_total"])
    assert f["relus"] <= res["budget"] and not f["forced_to_budget"]
    counts = [h["relus"] for h in s["history"]]
    lams = [h["lam"] for h in s["history"]]
    for e in range(1, len(counts) - 1):  # λ grew exactly after epochs that did not lower the count
        grew = lams[e + 1] > lams[e]
        assert grew == (counts[e] >= counts[e - 1]), (e, counts, lams)
    assert 0 <= f["test_acc"] <= 100

    cut = config.load(None, [f"out={tmp_path / 'cut'}", *overrides])
    with dies_at_epoch_checkpoint(4) as tags, pytest.raises(KeyboardInterrupt):
        runner.run(cut)  # after 3 search epochs: λ has grown, α moved
    assert tags == [{"stage": "search"}] * 4 and lams[3] > lams[1]
    _, resumed = runner.run(cut)
    assert untimed(resumed, tmp_path / "cut") == untimed(res, tmp_path)
