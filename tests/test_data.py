"""Input pipelines: every source kind on generated data, splits, determinism, sharding, errors."""
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxprune import data
from jaxprune.data import sources, transforms
from tests import tfds_fixture as synthetic
from jaxprune.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SIZE = 16  # generated images are tiny; loaders are asked for this size


def _colour(i: int) -> tuple[int, int, int]:
    """A flat colour that survives JPEG: image i is identified by (r, g) on a grid of 8."""
    return (8 * (i % 32) + 4, 8 * (i // 32) + 4, 128)


def _save(path: Path, i: int, size=(SIZE, SIZE)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", (size[1], size[0]), _colour(i)).save(path, format=fmt, quality=95)


def _ids(images: np.ndarray, info) -> np.ndarray:
    """Decode image identities back from normalized batches (the centre pixel)."""
    px = images[:, SIZE // 2, SIZE // 2, :2] * np.asarray(info.std[:2]) + np.asarray(info.mean[:2])
    r, g = np.round(px * 255).T
    return (np.round((r - 4) / 8) + 32 * np.round((g - 4) / 8)).astype(int)


def _epoch(name, root, split, **kw):
    kw = {"batch_size": 4, "seed": 0, "train": False, "image_size": SIZE, "process_index": 0,
          "process_count": 1, "num_workers": 0, **kw}
    return list(data.loader(name, root, split, **kw))


def _real_ids(batches, info):
    return np.concatenate([_ids(b["image"], info)[b["mask"] > 0] for b in batches])


@pytest.fixture(autouse=True)
def _fresh_scans():
    # generated folders change between tests at the same tmp paths
    data.clear_cache()
    yield
    data.clear_cache()


# ----------------------------------------------------------------------------- generated data sets

WNIDS = ["n02", "n01", "n03"]  # written unsorted: classes must come out sorted


@pytest.fixture
def tiny_root(tmp_path):
    """Tiny-ImageNet-200 as downloaded: train/<wnid>/images/, val/images/ + val_annotations.txt, test/images/."""
    d = tmp_path / "tiny-imagenet-200"
    i = 0
    for w in WNIDS:
        for k in range(10):
            _save(d / "train" / w / "images" / f"{w}_{k}.JPEG", i)
            i += 1
    lines = []
    for k in range(6):
        _save(d / "val" / "images" / f"val_{k}.JPEG", 100 + k)
        lines.append(f"val_{k}.JPEG\t{WNIDS[k % 3]}\t0\t0\t{SIZE}\t{SIZE}")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    _save(d / "test" / "images" / "test_0.JPEG", 200)
    (d / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    return tmp_path


@pytest.fixture
def pacs_root(tmp_path):
    """PACS, DomainBed layout: <domain>/<class>/ with mixed suffixes, plus files that are not images."""
    d = tmp_path / "PACS"
    i = 0
    for domain in ("photo", "sketch"):
        for c in ("horse", "dog", "guitar"):
            for k, suffix in enumerate([".jpg", ".png", ".jpeg", ".JPG", ".png"]):
                _save(d / domain / c / f"{k}{suffix}", i)
                i += 1
        (d / domain / "README.txt").write_text("not an image")
    (d / "photo" / "dog" / ".hidden.jpg").write_bytes(b"")
    return tmp_path


VARIANTS = ["A300B4", "F-16A/B", "Boeing 717"]


@pytest.fixture
def aircraft_root(tmp_path):
    """FGVC-Aircraft as released: data/images/<id>.jpg and images_variant_<split>.txt lists."""
    d = tmp_path / "fgvc-aircraft-2013b" / "data"
    i = 0
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        lines = []
        for v in VARIANTS:
            for _ in range(n):
                _save(d / "images" / f"{1000000 + i}.jpg", i, size=(20, 24))
                lines.append(f"{1000000 + i} {v}")
                i += 1
        (d / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.fixture
def tfds_root(tmp_path):
    """cifar10 in tfds's ArrayRecord format, written by tfds's own cifar10 builder (synthetic.write_tfds)."""
    def examples(start, n):
        return [(synthetic.encode(Image.new("RGB", (32, 32), _colour(i))), i % 10) for i in range(start, start + n)]

    synthetic.write_tfds("cifar10", tmp_path, {"train": examples(0, 60), "test": examples(60, 20)})
    return tmp_path


# ----------------------------------------------------------------------------- digits

def test_digits_splits_and_batches():
    info = data.describe("digits", None)
    assert info.splits == {"train": 1257, "val": 270, "test": 270}
    assert (info.num_classes, info.image_size, info.channels) == (10, (32, 32), 3)
    it = data.loader("digits", "/ignored", "train", batch_size=128, seed=0, train=True,
                     process_index=0, process_count=1)
    assert len(it) == 1257 // 128
    batches = list(it)
    assert len(batches) == len(it)
    b = batches[0]
    assert b["image"].shape == (128, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (128,) and b["label"].dtype == np.int32
    assert np.all(b["mask"] == 1)
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0  # mean = std = 0.5
    assert np.array_equal(b["image"][..., 0], b["image"][..., 2])  # grey in 3 channels


def test_digits_label_mapping_and_disjoint_splits():
    from sklearn.datasets import load_digits
    target = load_digits().target
    res = sources.resolve("digits", None)
    idx = {k: res.parts[k][1] for k in data.SPLITS}
    assert sum(len(v) for v in idx.values()) == 1797
    assert len(np.unique(np.concatenate(list(idx.values())))) == 1797
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in _epoch("digits", None, "test",
                                                                        batch_size=64, image_size=None)])
    assert np.array_equal(labels, target[idx["test"]])
    # stratified: every class in every split
    assert all(len(np.unique(target[v])) == 10 for v in idx.values())


def test_rotated_digits_keep_each_digit_in_one_split():
    """digits_rot: four rotations of every digit, all of a digit's in its digit's split (no
    rotation of a test digit is trained on), stratified 60/20/20 %; the rotations differ."""
    from sklearn.datasets import load_digits
    target = load_digits().target
    info = data.describe("digits_rot", None)
    assert info.splits == {"train": 4316, "val": 1436, "test": 1436}
    assert (info.num_classes, info.image_size) == (10, (32, 32))
    res = sources.resolve("digits_rot", None)
    digits = {k: res.parts[k][1] // sources.ROT_COPIES for k in data.SPLITS}
    assert sum(len(set(v)) for v in digits.values()) == 1797
    assert all(np.all(np.bincount(v)[np.unique(v)] == sources.ROT_COPIES) for v in digits.values())
    src, idx = res.parts["val"]
    assert all(src[i][1] == target[d] for i, d in zip(idx, digits["val"]))
    copies = np.stack([src[i][0] for i in idx[:sources.ROT_COPIES]])  # one digit's four
    assert len({c.tobytes() for c in copies}) == sources.ROT_COPIES


def test_determinism_and_epochs():
    kw = dict(batch_size=32, seed=3, train=True, process_index=0, process_count=1)
    a = list(data.loader("digits", None, "train", epoch=1, **kw))
    b = list(data.loader("digits", None, "train", epoch=1, **kw))
    c = list(data.loader("digits", None, "train", epoch=2, **kw))
    d = list(data.loader("digits", None, "train", epoch=1, **{**kw, "seed": 4}))
    assert all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
               for x, y in zip(a, b))
    assert not np.array_equal(a[0]["label"], c[0]["label"])
    assert not np.array_equal(a[0]["label"], d[0]["label"])
    # eval: fixed order whatever the seed and epoch, no augmentation
    e1 = _epoch("digits", None, "val", seed=1, epoch=0, image_size=None)
    e2 = _epoch("digits", None, "val", seed=9, epoch=5, image_size=None)
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(e1, e2))


def test_digits_augmentation_is_a_shift_not_a_flip():
    ev = _epoch("digits", None, "train", batch_size=1257, image_size=None)[0]
    train = next(iter(data.loader("digits", None, "train", batch_size=1257, seed=0, train=True,
                                  process_index=0, process_count=1, drop_remainder=False)))
    # each train example must be some eval image of its class moved by at most 2 px (zero fill,
    # which normalizes to -1), never a mirror image
    shifted = [_shift(ev["image"], dy, dx, -1.0) for dy in range(-2, 3) for dx in range(-2, 3)]
    for x, y in zip(train["image"][:40], train["label"][:40]):
        same = ev["label"] == y
        assert min(np.abs(s[same] - x).max(axis=(1, 2, 3)).min() for s in shifted) < 1e-5
    assert any(np.abs(s - train["image"][:1]).max() > 0 for s in shifted)


def _shift(imgs, dy, dx, fill):
    """imgs (N,H,W,C) moved by (dy, dx) pixels, uncovered pixels set to `fill`."""
    out = np.full_like(imgs, fill)
    h, w = imgs.shape[1:3]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        imgs[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


# ----------------------------------------------------------------------------- image folders

def test_tiny_imagenet_needs_refoldering_then_reads(tiny_root):
    with pytest.raises(UserError, match="prepare tiny_imagenet"):
        data.describe("tiny_imagenet", tiny_root)
    assert "3 classes" in data.prepare("tiny_imagenet", tiny_root)
    val = tiny_root / "tiny-imagenet-200" / "val"
    assert not (val / "images").exists() and (val / "n01" / "val_1.JPEG").is_file()
    info = data.describe("tiny_imagenet", tiny_root)
    assert info.classes == tuple(sorted(WNIDS)) and info.image_size == (64, 64)
    assert info.splits == {"train": 27, "val": 3, "test": 6}  # val: 10% of train; test: official val
    # official val (our test): labels come from val_annotations.txt
    batches = _epoch("tiny_imagenet", tiny_root, "test")
    ids = _real_ids(batches, info)
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    assert sorted(ids) == list(range(100, 106))
    assert all(info.classes[lab] == WNIDS[(i - 100) % 3] for i, lab in zip(ids, labels))
    # train/val: held-out split of train, labels by sorted wnid folder
    seen = []
    for split in ("train", "val"):
        batches = _epoch("tiny_imagenet", tiny_root, split)
        ids, labels = _real_ids(batches, info), np.concatenate([b["label"][b["mask"] > 0] for b in batches])
        assert all(info.classes[lab] == WNIDS[i // 10] for i, lab in zip(ids, labels))
        seen += list(ids)
    assert sorted(seen) == list(range(30))
    # prepare again is a no-op
    data.prepare("tiny_imagenet", tiny_root)
    assert data.describe("tiny_imagenet", tiny_root).splits == info.splits


def test_pooled_domains_split_80_10_10(pacs_root):
    info = data.describe("pacs", pacs_root)
    assert info.classes == ("dog", "guitar", "horse")
    assert info.splits == {"train": 24, "val": 3, "test": 3}  # 30 images; README/hidden skipped
    by_split = {s: _real_ids(_epoch("pacs", pacs_root, s), info) for s in data.SPLITS}
    assert sorted(np.concatenate(list(by_split.values()))) == list(range(30))
    data.clear_cache()
    again = {s: _real_ids(_epoch("pacs", pacs_root, s), info) for s in data.SPLITS}
    assert all(np.array_equal(by_split[s], again[s]) for s in data.SPLITS)  # fixed seed
    # label = sorted class folder: images were numbered domain-major, class order horse, dog, guitar
    b = _epoch("pacs", pacs_root, "train", batch_size=24)[0]
    for i, lab in zip(_ids(b["image"], info), b["label"]):
        assert info.classes[lab] == ("horse", "dog", "guitar")[(i % 15) // 5]


def test_vlcs_reads_the_same_layout(tmp_path):
    for i in range(20):
        _save(tmp_path / "VLCS" / ("Caltech101", "SUN09")[i % 2] / ("bird", "car")[i // 10] / f"{i}.jpg", i)
    info = data.describe("vlcs", tmp_path)
    assert info.splits == {"train": 16, "val": 2, "test": 2} and info.num_classes == 2


def test_aircraft_prepare_builds_official_splits(aircraft_root):
    with pytest.raises(UserError, match="prepare aircraft"):
        data.describe("aircraft", aircraft_root)
    data.prepare("aircraft", aircraft_root)
    info = data.describe("aircraft", aircraft_root)
    assert info.splits == {"train": 12, "val": 6, "test": 6}
    assert info.classes == ("A300B4", "Boeing 717", "F-16A-B")
    ids = _real_ids(_epoch("aircraft", aircraft_root, "test"), info)
    assert sorted(ids) == list(range(18, 24))
    data.prepare("aircraft", aircraft_root)  # idempotent
    assert data.describe("aircraft", aircraft_root).splits == info.splits


def test_prepare_unpacks_an_archive(tmp_path, pacs_root):
    import shutil
    archive = shutil.make_archive(str(tmp_path / "pacs_download"), "zip", pacs_root, "PACS")
    dest = tmp_path / "elsewhere"
    with pytest.raises(UserError, match="--archive FILE"):
        data.prepare("pacs", dest)
    assert "3 classes" in data.prepare("pacs", dest, archive=archive)
    assert data.describe("pacs", dest).splits == {"train": 24, "val": 3, "test": 3}


# ----------------------------------------------------------------------------- tfds

def test_tfds_array_record_source(tfds_root):
    info = data.describe("cifar10", tfds_root)
    assert info.splits == {"train": 54, "val": 6, "test": 20}  # val: 10% of train, as 5k of 50k
    assert info.num_classes == 10 and info.image_size == (32, 32)
    test = _epoch("cifar10", tfds_root, "test", batch_size=8)
    assert len(test) == 3 and test[-1]["mask"].sum() == 4  # 20 = 8 + 8 + 4 (padded)
    ids = _real_ids(test, info)
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in test])
    assert sorted(ids) == list(range(60, 80)) and np.array_equal(labels, ids % 10)
    tr = {s: _real_ids(_epoch("cifar10", tfds_root, s), info) for s in ("train", "val")}
    assert sorted(np.concatenate([tr["train"], tr["val"]])) == list(range(60))
    batch = next(iter(data.loader("cifar10", tfds_root, "train", batch_size=16, seed=0, train=True,
                                  process_index=0, process_count=1, num_workers=0)))
    assert batch["image"].shape == (16, 32, 32, 3)


def test_prepare_without_tensorflow_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
    with pytest.raises(UserError, match="needs TensorFlow"):
        data.prepare("dtd", tmp_path)


# ----------------------------------------------------------------------------- sharding, mixing, placement

def test_two_processes_get_disjoint_shards(tiny_root):
    data.prepare("tiny_imagenet", tiny_root)
    info = data.describe("tiny_imagenet", tiny_root)
    for train, drop in ((True, True), (False, False)):
        kw = dict(batch_size=6, seed=1, train=train, drop_remainder=drop, process_count=2)
        shards = [_epoch("tiny_imagenet", tiny_root, "train", process_index=p, **kw) for p in (0, 1)]
        assert len(shards[0]) == len(shards[1])
        assert all(b["image"].shape[0] == 3 for s in shards for b in s)  # per-process batch
        ids = [_real_ids(s, info) for s in shards]
        assert not set(ids[0]) & set(ids[1])
        both = np.concatenate(ids)
        assert len(both) == (24 if drop else 27)  # 27 train images: 4 whole batches of 6, or all
        if not drop:
            full = _real_ids(_epoch("tiny_imagenet", tiny_root, "train", batch_size=6), info)
            assert sorted(both) == sorted(full)


def test_mixup_and_cutmix_soft_labels():
    kw = dict(batch_size=64, seed=0, train=True, process_index=0, process_count=1)
    plain = next(iter(data.loader("digits", None, "train", **kw)))
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.2, 1.0)):
        b = next(iter(data.loader("digits", None, "train", mixup=mixup, cutmix=cutmix, **kw)))
        assert b["label"].shape == (64, 10) and b["label"].dtype == np.float32
        np.testing.assert_allclose(b["label"].sum(1), 1.0, rtol=1e-6)
        assert np.array_equal(b["label"].argmax(1) >= 0, np.ones(64, bool))
        if cutmix and not mixup:  # every pixel is the example's own or its partner's
            own = np.isclose(b["image"], plain["image"]).all(-1)
            theirs = np.isclose(b["image"], plain["image"][::-1]).all(-1)
            assert np.all(own | theirs) and not np.all(own)
            # one box per batch: the partner's label weight is its area, at least the changed pixels
            differ = plain["label"] != plain["label"][::-1]
            w = b["label"][np.arange(64), plain["label"][::-1]][differ]
            np.testing.assert_allclose(w, w[0], rtol=1e-6)
            assert 0 < w[0] < 1 and np.all(w + 1e-6 >= 1 - own.mean((1, 2))[differ])


def test_to_global_shards_over_the_data_axis():
    batch = _epoch("digits", None, "val", batch_size=8, image_size=None)[0]
    for n in (1, 2):
        mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
        g = data.to_global(batch, mesh)
        assert g["image"].shape == (8, 32, 32, 3) and len(g["image"].sharding.device_set) == n
        assert g["label"].sharding.spec == jax.sharding.PartitionSpec("data")
        np.testing.assert_array_equal(np.asarray(g["image"]), batch["image"])
    mesh = jax.make_mesh((2,), ("data",))
    with pytest.raises(UserError, match="multiple of 2"):
        data.to_global({k: v[:3] for k, v in batch.items()}, mesh)


# ----------------------------------------------------------------------------- errors and configs

def test_missing_data_names_path_and_command(tmp_path):
    for name, where in (("cifar10", tmp_path / "cifar10"), ("pacs", tmp_path / "PACS"),
                        ("tiny_imagenet", tmp_path / "tiny-imagenet-200")):
        with pytest.raises(UserError) as e:
            data.describe(name, tmp_path)
        assert str(where) in str(e.value)
        assert f"python -m jaxprune.data prepare {name} --root {tmp_path}" in str(e.value)
    r = subprocess.run([sys.executable, "-m", "jaxprune.data", "info", "flowers102", "--root", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "prepare flowers102" in lines[0] and str(tmp_path / "oxford_flowers102") in lines[0]


def test_bad_arguments_are_user_errors():
    kw = dict(batch_size=8, seed=0, train=False, process_index=0, process_count=1)
    with pytest.raises(UserError, match="unknown split"):
        data.loader("digits", None, "valid", **kw)
    with pytest.raises(UserError, match="did you mean"):
        data.describe("cifar", "/x")
    with pytest.raises(UserError, match="multiple of the process count"):
        data.loader("digits", None, "val", **{**kw, "batch_size": 9, "process_count": 2})
    with pytest.raises(UserError, match="fewer than one batch"):
        data.loader("digits", None, "val", **{**kw, "batch_size": 512, "train": True})
    with pytest.raises(UserError, match="needs a root"):
        data.describe("dtd", None)


def test_every_spec_transforms_to_its_size():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    for name in data.available():
        s = sources.spec(name)
        for size in ((s.image_size,) * 2, (24, 20)):
            for ops in (s.train_ops(size), s.eval_ops(size)):
                for k in range(3):
                    out = transforms.open_image(img)
                    for op in ops:
                        out = op(out, np.random.default_rng(k))
                    assert transforms.to_array(out, size).shape == (*size, 3), (name, size)
    every = transforms.RandAugment(n=len(transforms._RAND_OPS), m=10)
    for k in range(5):  # all ops, at full strength
        assert np.asarray(every(transforms.open_image(img), np.random.default_rng(k))).shape == (90, 120, 3)


def test_easier_configs_resolve():
    from jaxprune import config
    issue_names = {"digits", "cifar10", "tiny_imagenet", "pacs", "vlcs", "flowers102", "dtd", "aircraft",
                   "imagenet2012"}
    assert issue_names <= set(data.available())
    for path in sorted((REPO / "configs" / "easier").glob("*.yaml")):
        cfg = config.load(path)
        assert cfg.data.name in data.available(), path
        try:
            data.describe(cfg.data.name, cfg.data.root)
        except UserError as e:  # not on this machine: the message must say how to prepare it
            assert f"prepare {cfg.data.name}" in str(e), path


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(tiny_root):
    data.prepare("tiny_imagenet", tiny_root)
    kw = dict(batch_size=4, seed=2, train=True, image_size=SIZE, process_index=0, process_count=1)
    a = list(data.loader("tiny_imagenet", tiny_root, "train", num_workers=0, **kw))
    b = list(data.loader("tiny_imagenet", tiny_root, "train", num_workers=2, **kw))
    assert len(a) == len(b) and all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))


def test_a_folder_with_only_train_splits_80_10_10(tmp_path):
    for i in range(30):
        _save(tmp_path / "aircraft" / "train" / f"c{i % 3}" / f"{i}.jpg", i)
    info = data.describe("aircraft", tmp_path)
    assert info.splits == {"train": 24, "val": 3, "test": 3}
    ids = np.concatenate([_real_ids(_epoch("aircraft", tmp_path, s), info) for s in data.SPLITS])
    assert sorted(ids) == list(range(30))
