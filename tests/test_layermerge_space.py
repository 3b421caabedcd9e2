"""The ECDC search space of the project's models (`jaxprune.methods.layermerge.space`):
positions, breaks, residual blocks and segment counts against the reference rules
(ResNet-18 derived, ResNet-34 and MobileNetV2 as the reference code counts them),
positions against the models' activation sites, and plans applied to a model: the sites
linearized, the activations inserted, and `merge` cutting exactly at the plan's pieces,
with the fused model equal to the planned one (merge's own check)."""
import numpy as np
import pytest
from flax import nnx

import jaxprune
import models
from jaxprune.errors import UserError
from jaxprune.methods.layermerge.dp import MERGED, Plan, PlanSegment, SearchError, solve, t_opt
from jaxprune.methods.layermerge.space import apply_edits, build_space
from models.net import randomize_bn


def _shape_only(arch, **options):
    """The model's graph and layer attributes, without initialising weights."""
    return nnx.eval_shape(lambda: models.create(arch, num_classes=10, **options))


# arch, options -> L, segments, breaks, residual blocks, forced boundaries (no segment crosses)
RESNET18 = (16, 22, (5, 9, 13), tuple((2 * b, 2 * b + 2) for b in range(8)),
            [0, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16])
# the reference's ResNet-34 (LayerMerge): strided conv1 of stages 2-4 at 7, 15, 27
RESNET34 = (32, 62, (7, 15, 27), tuple((2 * b, 2 * b + 2) for b in range(16)),
            [0, 6, 7, 8, 14, 15, 16, 26, 27, 28, 32])
MBV2 = (50, 171, (5, 11, 20, 41),
        ((5, 8), (11, 14), (14, 17), (20, 23), (23, 26), (26, 29), (32, 35), (35, 38),
         (41, 44), (44, 47)), [0, 5, 11, 20, 41, 50])
EXPECTED = [("resnet18_cifar", {}, RESNET18), ("resnet18", {}, RESNET18),
            ("resnet34", {}, RESNET34),
            ("mobilenet_v2", {}, MBV2), ("mobilenet_v2", {"width_mult": 1.4}, MBV2),
            ("mobilenet_v2", {"layout": "timm"}, MBV2)]


@pytest.mark.parametrize("arch,options,expected", EXPECTED)
def test_space_matches_the_reference_rules(arch, options, expected):
    ms = build_space(_shape_only(arch, **options))
    L, n_segments, breaks, residual, forced = expected
    assert ms.space.positions == L
    assert len(ms.segments) == n_segments
    assert ms.breaks == breaks and ms.residual == residual
    assert sorted(ms.space.forced) == forced


def test_resnet_positions_are_its_sites():
    m = _shape_only("resnet18")
    ms = build_space(m)
    assert ms.positions[0].site == "relu" and ms.positions[0].tensor == "maxpool"
    blocks = [f"layer{s}.{k}" for s in range(1, 5) for k in range(2)]
    for b, p in enumerate(blocks):
        assert ms.positions[2 * b + 1].site == f"{p}.relu1"
        assert ms.positions[2 * b + 2].site == f"{p}.relu2"
        assert ms.convs(2 * b, 2 * b + 2) == (f"{p}.conv1", f"{p}.conv2")
    assert not ms.space.act_free and ms.free_after == {}
    # the reference rules leave six ReLUs a plan can remove (strictly inside a segment)
    removable = {q.site for i, j in ms.segments for q in ms.positions[i + 1:j]}
    assert removable == {"layer1.0.relu1", "layer1.0.relu2", "layer1.1.relu1",
                         "layer2.1.relu1", "layer3.1.relu1", "layer4.1.relu1"}


def test_mobilenet_positions_are_its_sites_and_block_ends():
    m = _shape_only("mobilenet_v2")
    ms = build_space(m)
    pos = ms.positions
    assert (pos[0].site, pos[1].site, pos[2].site) == ("features.0.act", "features.1.act_dw",
                                                       None)
    for n in range(2, 18):
        p = 3 * (n - 2)
        assert pos[p + 3].site == f"features.{n}.act_expand"
        assert pos[p + 4].site == f"features.{n}.act_dw"
        assert pos[p + 5].site is None
        add = f"features.{n}.add"
        assert pos[p + 5].tensor == (add if add in m.layers else f"features.{n}.conv.3")
    block_ends = [2] + [3 * (n - 2) + 5 for n in range(2, 18)]
    assert sorted(ms.space.act_free) == block_ends
    assert ms.free_after[5] == ("features.2.conv.3", "features.2.final_act")
    removable = {q.site for i, j in ms.segments for q in pos[i + 1:j] if q.site}
    assert len(removable) == 33 and "features.18.act" not in removable
    assert {q.site for q in pos if q.site} == set(m.sites()) - {"features.18.act"}


def test_cifar_mobilenet_breaks_follow_its_strides():
    # stage 2 runs at stride 1 here: no break after features.2's depthwise conv
    ms = build_space(_shape_only("mobilenet_v2_cifar"))
    assert ms.breaks == (11, 20, 41)
    # features.2's depthwise conv and projection may merge with features.3 (whole)
    assert (4, 8) in ms.segments and (4, 8) not in build_space(_shape_only("mobilenet_v2")).segments


def test_unsupported_model_is_refused():
    with pytest.raises(UserError, match="layermerge has search-space rules for"):
        build_space(_shape_only("vgg16_bn"))


# -- plans applied to a model ---------------------------------------------------------------

SMALL = {"resnet18_cifar": dict(width=4), "mobilenet_v2_cifar": dict(width_mult=0.1)}
HW = (8, 8)


@pytest.fixture(scope="module")
def small():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = randomize_bn(models.create(arch, num_classes=10, **SMALL[arch]))
        return nnx.clone(cache[arch])
    return get


def _plan(L, boundaries, act_on=frozenset()):
    segs = tuple(PlanSegment(i, j, MERGED, j in act_on, 0.0, 0, 0.0)
                 for i, j in zip(boundaries, boundaries[1:]))
    assert boundaries[-1] == L
    return Plan(L, segs, 0.0, 0.0, 0, 1.0, 1, 1.0, "ceil")


def _every_site_kept(ms):
    return {p.index for p in ms.positions if p.site}


def _dense(ms):
    """Every conv its own segment; the block ends stay linear: the model as it is."""
    L = ms.space.positions
    return _plan(L, list(range(L + 1)), _every_site_kept(ms))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_the_unmerged_plan_changes_nothing(arch):
    ms = build_space(_shape_only(arch))
    # MobileNetV2's block ends stay linear and unmerged: the plan cuts there
    ends = [ms.positions[p].tensor for p in sorted(ms.free_after)]
    assert ms.edits(_dense(ms)).as_dict() == {"linearize": [], "insert_act": {}, "drop": [],
                                              "cuts": ends}


def _fewest(ms):
    """Only the forced boundaries; an activation inserted at every free one."""
    L = ms.space.positions
    return _plan(L, sorted(ms.space.forced), set(range(L + 1))), None


def _searched(ms):
    """The DP's plan on random tables, each segment run as its T_opt pieces."""
    rng = np.random.default_rng(1)
    T = {s: float(rng.uniform(0.5, 1.5)) for s in ms.segments}
    topt, pieces = t_opt(T, ms.segments)
    imp = {(i, j, a, b): float(rng.normal()) for i, j in ms.segments
           for a in ms.space.acts(i) for b in ms.space.acts(j)}
    full = sum(topt[(k, k + 1)] for k in range(ms.space.positions))
    return solve(ms.space, topt, imp, 0.9 * full), pieces


@pytest.mark.parametrize("arch", sorted(SMALL))
@pytest.mark.parametrize("make", [_fewest, _searched])
def test_plan_applied_and_merged_is_exact(small, arch, make):
    m = small(arch)
    ms = build_space(m)
    plan, pieces = make(ms)
    edits = ms.edits(plan, pieces)
    apply_edits(m, edits)
    inside = {q.site for s in plan.segments for q in ms.positions[s.start + 1:s.end] if q.site}
    assert set(jaxprune.linearized(m)) == inside == set(edits.linearize)
    inserted = {ms.free_after[s.end][1] for s in plan.segments
                if s.end in ms.free_after and s.act_end}
    assert set(edits.insert_act) == inserted and inserted <= set(m.sites())
    fused, rep = jaxprune.merge(m, input_size=HW, cost="none", cuts=edits.cuts,
                                return_report=True)
    assert rep.max_abs_diff <= 1e-5 * max(rep.logit_scale, 1.0)
    # every piece of the plan is one layer of the merged model, and nothing else merges convs
    want = set()
    for s in plan.segments:
        run = (pieces or {}).get((s.start, s.end), (s.start, s.end))
        want |= {frozenset(ms.convs(a, b)) for a, b in zip(run, run[1:])}
    main = {p.conv for p in ms.positions if p.conv}
    got = {frozenset(main & set(f["replaces"])) for f in rep.fused} - {frozenset()}
    assert got == want


def test_bad_plans_are_refused(small):
    ms = build_space(small("resnet18_cifar"))
    with pytest.raises(SearchError, match="the plan has 3 positions, this model's space 16"):
        ms.edits(_plan(3, [0, 3]))
    # (0, 5) ends inside the residual block 4 -> 6
    with pytest.raises(SearchError, match=r"segment \(0, 5\) is not in this model's space"):
        ms.edits(_plan(16, [0, 5, *range(6, 17)], set(range(17))))
    with pytest.raises(SearchError, match="drops the activation at position 1"):
        ms.edits(_plan(16, list(range(17)), set(range(2, 17))))


def test_merge_refuses_an_unknown_cut(small):
    m = small("resnet18_cifar")
    with pytest.raises(UserError, match="cut 'layer1.0.relu3' is not a layer.*layer1.0.relu1"):
        jaxprune.merge(m, input_size=HW, cuts=["layer1.0.relu3"])


# -- layer dropping (LayerMerge's space) --------------------------------------------------

def test_layer_dropping_space_matches_the_reference(small):
    """LayerMerge's entry counts (its DP.md: MobileNetV2 391; ResNet-18 derived, 30), the
    droppable convs, the option keys and the kept convs of largest L1 norm."""
    m = small("resnet18_cifar")
    ms = build_space(m, drop_layers=True)
    assert len(ms.segments) == 22 and len(ms.entries()) == 30
    droppable = {c for c, f in ms.conv_facts.items() if f.droppable}
    strided = {f"layer{s}.0.conv1" for s in (2, 3, 4)}
    assert droppable == {p.conv for p in ms.positions[1:]} - strided
    assert ms.space.options[(0, 4)] == ("k3s1d", "k5s1d", "k7s1d", "k9s1d")
    assert ms.space.options[(4, 5)] == ("k3s2d",) and ms.space.options[(6, 8)] == ("k3s1d", "k5s1d")
    l1 = {c: float(np.abs(np.asarray(m.layers[c].kernel.value)).sum()) for c in ms.convs(0, 4)}
    by_norm = sorted(l1, key=l1.get, reverse=True)
    for k, option in enumerate(ms.space.options[(0, 4)], start=1):
        assert set(ms.keep[(0, 4, option)]) == set(by_norm[:k])
        assert set(ms.dropped(0, 4, option)) == set(by_norm[k:])
    assert ms.hash != build_space(m).hash
    assert not ms.space.act_free and all(ms.end_acts(i, j) == (1,) for i, j in ms.segments)

    mb = build_space(models.create("mobilenet_v2", num_classes=10), drop_layers=True)
    assert (len(mb.segments), len(mb.entries())) == (171, 391)
    dw = {c for c, f in mb.conv_facts.items() if f.droppable}
    assert all(mb.conv_facts[c].depthwise and mb.conv_facts[c].stride == 1 for c in dw)
    assert len(dw) == 13 and "features.1.conv.0.0" in dw
    # a dropped depthwise conv leaves the block's 1x1 convs: kernel 1; kept: 3, dense
    assert mb.space.options[(5, 8)] == ("k1s1d", "k3s1d")
    assert mb.space.options[(6, 7)] == ("k3s1dw",)
    # no free flag: a block end is nonlinear iff its segment merges two or more convs
    assert mb.end_acts(7, 8) == (0,) and mb.end_acts(6, 8) == (1,) and mb.end_acts(5, 8) == (1,)
    assert mb.end_acts(6, 7) == (1,)


@pytest.mark.parametrize("option, kernel", [("k3s2d", (3, 3)), ("k7s2d", (7, 7))])
def test_strided_blocks_merge_a_downsampling_block_whole(small, option, kernel):
    """Beyond the papers: with `strided_blocks` a ResNet downsampling block (strided conv1,
    1x1 strided shortcut) is also one segment. Keeping conv1 alone drops conv2 and merges
    the block into one strided 3x3 conv, the shortcut in its centre tap; keeping both is
    one 7x7 conv of stride 2 (3 + (3 - 1) x 2). Either merges exactly."""
    m = small("resnet18_cifar")
    papers = build_space(m, drop_layers=True)
    ms = build_space(m, drop_layers=True, strided_blocks=True)
    assert set(ms.entries()) - set(papers.entries()) == {
        (i, i + 2, o) for i in (4, 8, 12) for o in ("k3s2d", "k7s2d")}
    assert ms.keep[(4, 6, "k3s2d")] == ("layer2.0.conv1",) and ms.hash != papers.hash
    assert build_space(_shape_only("mobilenet_v2_cifar"), strided_blocks=True).hash == \
        build_space(_shape_only("mobilenet_v2_cifar")).hash   # its strided blocks add nothing
    segs = [PlanSegment(i, i + 1, "k3s2d" if i in (4, 8, 12) else "k3s1d", True, 0.0, 0, 0.0)
            for i in range(16) if i not in (4, 5)]
    segs.insert(4, PlanSegment(4, 6, option, True, 0.0, 0, 0.0))
    edits = ms.edits(Plan(16, tuple(segs), 0.0, 0.0, 0, 1.0, 1, 1.0, "ceil"))
    assert edits.linearize == ("layer2.0.relu1",)
    assert edits.drop == (("layer2.0.conv2",) if option == "k3s2d" else ())
    apply_edits(m, edits)
    fused, rep = jaxprune.merge(m, input_size=HW, cost="none", cuts=edits.cuts,
                                return_report=True)
    assert rep.max_abs_diff <= 1e-5 * max(rep.logit_scale, 1.0)
    block, = [f for f in rep.fused if "layer2.0.conv1" in f["replaces"]]
    assert "layer2.0.downsample.0" in block["replaces"]
    layer = fused.layers[block["layer"]]
    assert (layer.kernel_size, layer.stride) == (kernel, (2, 2))
    with pytest.raises(SearchError, match=r"segment \(4, 6\) is not in this model's space .*"
                       r"method.strided_blocks"):
        papers.edits(Plan(16, tuple(segs), 0.0, 0.0, 0, 1.0, 1, 1.0, "ceil"))


def test_layer_dropping_needs_weights():
    with pytest.raises(UserError, match="picks the convs each option keeps by their weights"):
        build_space(_shape_only("resnet18_cifar", width=4), drop_layers=True)


def _torch_with_identity(m, arch, options, dropped):
    """The torch original (converters.torch_reference, `m`'s weights) with each conv in
    `dropped` and its BatchNorm replaced by nn.Identity."""
    import torch

    import converters
    from converters import torch_reference
    t = torch_reference.build(arch, num_classes=10, **options)
    t.load_state_dict(converters.to_torch(m).state_dict())
    for conv in dropped:
        parent, leaf = conv.rsplit(".", 1)
        # torchvision's names: BasicBlock convN -> bnN; MobileNetV2 conv.k.0 -> conv.k.1
        bn = leaf.replace("conv", "bn") if leaf.startswith("conv") else str(int(leaf) + 1)
        holder = t.get_submodule(parent)
        setattr(holder, leaf, torch.nn.Identity())
        setattr(holder, bn, torch.nn.Identity())
    return t.eval()


@pytest.mark.parametrize("arch,dropped", [
    ("resnet18_cifar", ["layer1.0.conv2"]),
    ("resnet18_cifar", ["layer1.1.conv1", "layer1.1.conv2"]),   # a whole branch: x + relu(x)
    ("resnet18_cifar", ["layer2.0.conv2"]),     # a downsampling block's (strided_blocks)
    ("mobilenet_v2", ["features.3.conv.1.0"]),                  # a residual depthwise conv
])
def test_dropped_conv_is_the_torch_model_with_an_identity(small, arch, dropped):
    """The model with `dropped` made the identity (`drop_conv`) against the torch original
    with those convs and their BatchNorms replaced by nn.Identity. (The tiny MobileNetV2's
    logits hardly depend on its input, so it is compared at the dropped block's output.)"""
    import torch

    from jaxprune.methods.layermerge.space import drop_conv
    from models.net import Net
    options = SMALL.get(arch, dict(width_mult=0.1))
    m = randomize_bn(models.create(arch, num_classes=10, **options)) if arch not in SMALL \
        else small(arch)
    t = _torch_with_identity(m, arch, options, dropped)
    original = nnx.clone(m)
    for conv in dropped:
        drop_conv(m, conv)
        assert conv not in m.layers
    if arch.startswith("mobilenet"):
        t = t.features[:4]
        m, original = (Net(n.layers, n.graph[:[a for a, _ in n.graph].index("features.3.add") + 1],
                           n.spec) for n in (m, original))
    m.eval()
    original.eval()
    x = np.random.default_rng(0).normal(size=(2, *HW, 3)).astype(np.float32)
    ours = np.asarray(m(x))
    with torch.no_grad():
        theirs = t(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    if theirs.ndim == 4:
        theirs = theirs.transpose(0, 2, 3, 1)
    scale = max(np.abs(theirs).max(), 1.0)
    assert np.abs(ours - theirs).max() <= 1e-4 * scale
    assert np.abs(ours - np.asarray(original(x))).max() > 1e-2 * scale   # it did change


def _searched_with_drops(ms):
    """The DP's plan on an LM space: latency grows with the merged kernel, so a budget
    of 0.7 of the unmerged convs needs drops."""
    rng = np.random.default_rng(0)
    T = {(i, j, o): 1.0 + 0.1 * int(o[1:o.index("s")]) for i, j, o in ms.entries()}
    imp = {(i, j, o, a, b): float(rng.normal()) for i, j, o in ms.entries()
           for a in ms.space.acts(i) for b in ms.end_acts(i, j)}
    full = sum(t for (i, j, _), t in T.items() if j == i + 1)
    return solve(ms.space, T, imp, 0.7 * full)


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_plan_with_drops_applied_and_merged_is_exact(small, arch):
    m = small(arch)
    ms = build_space(m, drop_layers=True)
    plan = _searched_with_drops(ms)
    edits = ms.edits(plan)
    assert edits.drop and set(edits.drop) == {c for s in plan.segments
                                              for c in ms.dropped(s.start, s.end, s.option)}
    # the drops a plan names replay to the same edits
    assert ms.edits(plan, drop=list(edits.drop)) == edits
    apply_edits(m, edits)
    assert not set(edits.drop) & set(m.layers)
    fused, rep = jaxprune.merge(m, input_size=HW, cost="none", cuts=edits.cuts,
                                return_report=True)
    assert rep.max_abs_diff <= 1e-5 * max(rep.logit_scale, 1.0)
    # every segment is one layer of exactly its kept convs
    main = {p.conv for p in ms.positions if p.conv}
    got = {frozenset(main & set(f["replaces"])) for f in rep.fused} - {frozenset()}
    assert got == {frozenset(ms.keep[(s.start, s.end, s.option)]) for s in plan.segments}


def test_plans_dropping_what_they_may_not_are_refused(small):
    ms = build_space(small("resnet18_cifar"), drop_layers=True)
    plan = _searched_with_drops(ms)
    drop = list(ms.edits(plan).drop)
    with pytest.raises(SearchError, match="drops 'layer2.0.conv1', an irreducible conv"):
        ms.edits(plan, drop=[*drop, "layer2.0.conv1"])
    with pytest.raises(SearchError, match="drops 'layer1.0.conv3', not a searched conv of "
                                          "resnet18_cifar; did you mean 'layer1.0.conv"):
        ms.edits(plan, drop=[*drop, "layer1.0.conv3"])
    with pytest.raises(SearchError, match=r"keeps .* which does not merge into its option"):
        ms.edits(plan, drop=drop[1:])
    with pytest.raises(SearchError, match="has no layer dropping"):
        build_space(small("resnet18_cifar")).edits(_dense(build_space(small("resnet18_cifar"))),
                                                   drop=drop)


@pytest.mark.parametrize("arch,last", [("resnet18_cifar", 8), ("mobilenet_v2", 5)])
def test_dp_on_a_layer_dropping_space_is_brute_force(small, arch, last):
    """The LM rules (kernel options; MobileNetV2's block-end activation set by the
    segment) through `solve` and `brute_force`, on the model's space up to a forced
    boundary `last`, with the proxy importance of random site entropies."""
    from jaxprune.methods.layermerge.dp import Space, brute_force
    from jaxprune.methods.layermerge.importance import segment_importance
    m = small(arch) if arch in SMALL else models.create(arch, num_classes=10, width_mult=0.35)
    ms = build_space(m, drop_layers=True)
    rng = np.random.default_rng(3)
    scores = {p.site: float(rng.uniform()) for p in ms.positions if p.site}
    imp = {k: v for k, v in segment_importance(ms, scores).items() if k[1] <= last}
    opts = {s: o for s, o in ms.space.options.items() if s[1] <= last}
    space = Space(last, opts, ms.space.act_free & set(range(1, last + 1)))
    T = {(i, j, o): float(rng.uniform(0.5, 2.0)) for (i, j), os_ in opts.items() for o in os_}
    assert any(len(o) > 1 for o in opts.values())
    full = sum(t for (i, j, _), t in T.items() if j == i + 1)
    for frac in (1.0, 0.8, 0.6):
        try:
            want = brute_force(space, T, imp, frac * full, bins=200)
        except SearchError:
            continue
        got = solve(space, T, imp, frac * full, bins=200)
        assert got == want
