"""The data sets: what each one is, where it is read from, how it splits, how it augments.

Three kinds of source (DESIGN.md §8):

* built in, no download (kind "builtin"):
  - `digits` — `sklearn.datasets.load_digits()` (1797 real 8x8 grey digits),
    upsampled once to 32x32 RGB (bilinear). Stratified fixed split (seed 0):
    1257 train / 270 val / 270 test. Normalized with mean = std = 0.5 (pixels land
    in [-1, 1]; digits are not natural images, so ImageNet statistics mean nothing).
    Train augmentation: random shifts of up to 2 px (zero fill). No flips: a
    mirrored digit is a different symbol.
  - `digits_rot` — the same digits at any rotation, the construction of MNIST-rot
    (Larochelle et al., "An empirical evaluation of deep architectures on problems
    with many factors of variation", ICML 2007): each digit is drawn at 24x24 in a
    32x32 frame and rendered `ROT_COPIES` (4) times at fixed angles drawn uniformly
    from [0, 360) (seed 0). The digits split 60/20/20 % (stratified, seed 0), every
    copy of a digit in its digit's split: 4316 train / 1436 val / 1436 test, so a
    validation point is 14 images. A linear classifier reaches about 60 % on
    rotated digits, a nonlinear one about 95 %: the nonlinearity a depth-reduction
    method removes shows in the accuracy. Normalized and augmented as digits.
* tfds (`cifar10`, `flowers102`, `dtd`, `imagenet2012`) — read with
  `tfds.data_source` from ArrayRecord files under `root` (no TensorFlow needed to
  read; `python -m jaxprune.data prepare NAME --root DIR` writes them once).
* image folders (`tiny_imagenet`, `pacs`, `vlcs`, `aircraft`) under `root/<dir>`.
  Layout "split": `<dir>/<split>/<class>/**/*.{jpg,jpeg,png}`; "pooled" (PACS,
  VLCS, every domain together): `<dir>/<domain>/<class>/**/*`. Classes sorted.

Splits (`train` / `val` / `test`), all fixed, independent of the run's seed:

| data set | train | val | test |
|---|---|---|---|
| digits | 1257 | 270 | 270 (stratified, seed 0) |
| digits_rot | 4316 | 1436 | 1436 (4 rotations of each of 60/20/20 % of the digits, stratified, seed 0) |
| cifar10 | 45k of train | 5k of train (random, seed 0) | test 10k |
| tiny_imagenet | 90% of train | 10% of train (seed 0) | the official val (10k) |
| pacs, vlcs | 80% | 10% | 10% of all domains pooled (seed 0) |
| flowers102, dtd | train | validation | test (official; dtd's split 1) |
| aircraft | train | val | test (official) |
| imagenet2012 | train less 10k | 10k of train (seed 0) | the official validation (50k) |

A folder data set in the "split" layout without a `test/` uses its `val/` as the
test split and holds out part of `train/` as val; with neither, 80/10/10 of train.
Natural images are normalized with the ImageNet mean/std.

Scans of folders are cached per process (`clear_cache()` after the files change).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shlex
from pathlib import Path
from typing import Callable

import numpy as np

from jaxprune.data import transforms as T
from jaxprune.errors import MissingInput, UserError, closest

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_SEED = 0  # fixed: a data split never depends on the run's seed


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: tuple[int, int]  # (H, W) the loader produces by default
    channels: int
    splits: dict[str, int]       # examples per split
    mean: tuple[float, ...] = T.IMAGENET_MEAN  # normalization the loader applies, per channel
    std: tuple[float, ...] = T.IMAGENET_STD
    classes: tuple[str, ...] = ()  # class names, in label order


Ops = Callable[[tuple[int, int]], tuple]


def _scaled(size: tuple[int, int], quoted: int) -> tuple[int, int]:
    """A resize quoted for 224-px crops (e.g. "resize 256"), scaled to the requested crop size."""
    return round(size[0] * quoted / 224), round(size[1] * quoted / 224)


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    title: str
    kind: str                   # "builtin" | "tfds" | "folder"
    image_size: int
    num_classes: int            # as published; what is on disk decides (`describe`)
    train_ops: Ops
    eval_ops: Ops
    mean: tuple[float, ...] = T.IMAGENET_MEAN
    std: tuple[float, ...] = T.IMAGENET_STD
    holdout: float | int = 0.1  # val carved from train (fraction or count) when there is no val split
    tfds_name: str | None = None
    tfds_splits: dict | None = None  # our split -> tfds split; val None: carved from train
    dirs: tuple[str, ...] = ()  # folder names looked for under root (case-insensitive)
    layout: str = "split"       # "split" | "pooled"
    url: str | None = None      # archive `prepare` downloads
    obtain: str = ""            # what a user must fetch by hand, when `prepare` cannot


def _native(extra: Callable[[tuple[int, int]], tuple] = lambda s: ()) -> Ops:
    """Ops for a data set stored at its training size: resize only if another size is asked."""
    return lambda s: (T.Resize(s), *extra(s))


def _resize_crop(quoted: int, crop) -> Ops:
    """Resize to cover `quoted` px (quoted for a 224 crop), then crop."""
    return lambda s: (T.ResizeCover(_scaled(s, quoted)), crop(s))


_OFFICIAL = {"train": "train", "val": "validation", "test": "test"}

SPECS: dict[str, Spec] = {s.name: s for s in [
    Spec("digits", "digits (sklearn)", "builtin", 32, 10,
         train_ops=_native(lambda s: (T.PadCrop(s, pad=max(1, round(min(s) / 16))),)),
         eval_ops=_native(), mean=(0.5,) * 3, std=(0.5,) * 3),
    Spec("digits_rot", "rotated digits (sklearn, MNIST-rot's construction)", "builtin", 32, 10,
         train_ops=_native(lambda s: (T.PadCrop(s, pad=max(1, round(min(s) / 16))),)),
         eval_ops=_native(), mean=(0.5,) * 3, std=(0.5,) * 3),
    Spec("cifar10", "CIFAR-10", "tfds", 32, 10,
         train_ops=_native(lambda s: (T.PadCrop(s, pad=round(min(s) / 8)), T.Flip())),
         eval_ops=_native(), tfds_name="cifar10",
         tfds_splits={"train": "train", "val": None, "test": "test"}),
    Spec("flowers102", "Oxford Flowers-102", "tfds", 224, 102,
         train_ops=lambda s: (T.ResizeCover(_scaled(s, 256)), T.Rotate(30), T.RandomCrop(s),
                              T.Flip(vertical=True)),
         eval_ops=_resize_crop(256, T.CenterCrop), tfds_name="oxford_flowers102", tfds_splits=_OFFICIAL),
    Spec("dtd", "Describable Textures (DTD)", "tfds", 224, 47,
         train_ops=lambda s: (T.ResizeCover(_scaled(s, 256)), T.RandomCrop(s), T.Flip(vertical=True)),
         eval_ops=_resize_crop(256, T.CenterCrop), tfds_name="dtd", tfds_splits=_OFFICIAL),
    Spec("imagenet2012", "ImageNet-2012", "tfds", 224, 1000,
         train_ops=lambda s: (T.RandomResizedCrop(s), T.Flip(), T.RandAugment(n=2, m=5)),
         eval_ops=_resize_crop(256, T.CenterCrop), holdout=10_000, tfds_name="imagenet2012",
         tfds_splits={"train": "train", "val": None, "test": "validation"},
         obtain="tfds cannot download ImageNet: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
                "(from image-net.org) in ROOT/downloads/manual first"),
    Spec("tiny_imagenet", "Tiny-ImageNet-200", "folder", 64, 200,
         train_ops=_native(lambda s: (T.Flip(),)), eval_ops=_native(),
         dirs=("tiny-imagenet-200", "tiny_imagenet"),
         url="http://cs231n.stanford.edu/tiny-imagenet-200.zip"),
    Spec("pacs", "PACS", "folder", 224, 7,
         train_ops=lambda s: (T.RandomResizedCrop(s, scale=(0.7, 1.0)), T.Flip(), T.ColorJitter(0.4)),
         eval_ops=lambda s: (T.Resize(s),), dirs=("PACS",), layout="pooled",
         obtain="FILE: the PACS archive, domain folders art_painting/cartoon/photo/sketch, e.g. from "
                "DomainBed's download script"),
    Spec("vlcs", "VLCS", "folder", 224, 5,
         train_ops=lambda s: (T.RandomResizedCrop(s, scale=(0.7, 1.0)), T.Flip(), T.ColorJitter(0.4)),
         eval_ops=lambda s: (T.Resize(s),), dirs=("VLCS",), layout="pooled",
         obtain="FILE: the VLCS archive, domain folders Caltech101/LabelMe/SUN09/VOC2007, e.g. from "
                "DomainBed's download script"),
    Spec("aircraft", "FGVC-Aircraft", "folder", 224, 100,
         train_ops=_resize_crop(512, T.RandomCrop), eval_ops=_resize_crop(512, T.CenterCrop),
         dirs=("fgvc-aircraft-2013b", "aircraft", "fgvc_aircraft"),
         url="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"),
]}


def available() -> list[str]:
    return sorted(SPECS)


def spec(name: str) -> Spec:
    if name not in SPECS:
        raise UserError(f"unknown data set {name!r}; {closest(name, SPECS)}")
    return SPECS[name]


def prepare_command(name: str, root) -> str:
    s = spec(name)
    archive = " --archive FILE" if s.kind == "folder" and s.url is None else ""
    return f"python -m jaxprune.data prepare {name} --root {shlex.quote(str(root))}{archive}"


# ----------------------------------------------------------------------------- sources
# A source maps an index to (image, label); image is a uint8 array or a file path.

class ArraySource:
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


class FileSource:
    def __init__(self, paths: list[str], labels: np.ndarray):
        self.paths, self.labels = paths, labels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.paths[i], int(self.labels[i])


class TfdsSource:
    """One tfds split as ArrayRecord, opened lazily so that it pickles into grain workers."""

    def __init__(self, tfds_name: str, data_dir: str, split: str):
        self.tfds_name, self.data_dir, self.split = tfds_name, data_dir, split
        self._ds = None

    @property
    def ds(self):
        if self._ds is None:
            import tensorflow_datasets as tfds
            self._ds = tfds.data_source(self.tfds_name, data_dir=self.data_dir, split=self.split)
        return self._ds

    def __getstate__(self):
        return {**self.__dict__, "_ds": None}

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        ex = self.ds[i]
        return ex["image"], int(ex["label"])


@dataclasses.dataclass(frozen=True, eq=False)
class Resolved:
    spec: Spec
    info: DatasetInfo
    parts: dict  # split -> (source, indices into it)


def _carve(n: int, holdout: float | int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) index sets of range(n), sorted, random with the fixed split seed."""
    k = holdout if isinstance(holdout, int) else round(n * holdout)
    if not 0 < k < n:
        raise UserError(f"cannot hold out {k} of {n} examples for validation; the data set is too small")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _info(s: Spec, classes, parts, channels=3) -> DatasetInfo:
    return DatasetInfo(s.name, len(classes), (s.image_size, s.image_size), channels,
                       {k: len(parts[k][1]) for k in SPLITS}, s.mean, s.std, tuple(classes))


# ----------------------------------------------------------------------------- built in

def _grey_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 digits as uint8 8x8 images (pixel values 0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int32)


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def _stratified(labels: np.ndarray, val: int, test: int) -> dict[str, np.ndarray]:
    """Fixed stratified split (seed 0) of range(len(labels)) into train/val/test indices."""
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(labels))
    train, rest = train_test_split(idx, test_size=val + test, stratify=labels,
                                   random_state=SPLIT_SEED)
    v, t = train_test_split(rest, test_size=test, stratify=labels[rest], random_state=SPLIT_SEED)
    return {"train": np.sort(train), "val": np.sort(v), "test": np.sort(t)}


def _digits():
    from PIL import Image
    grey, labels = _grey_digits()
    up = np.stack([np.asarray(Image.fromarray(g).resize((32, 32), T.BILINEAR)) for g in grey])
    return _rgb(up), labels, _stratified(labels, 270, 270)


ROT_COPIES = 4  # rotated renderings of every digit in digits_rot


def _digits_rot():
    """MNIST-rot's construction on sklearn's digits (see the module docstring)."""
    from PIL import Image
    grey, labels = _grey_digits()
    n = len(labels)
    split = _stratified(labels, round(0.2 * n), round(0.2 * n))
    angles = np.random.default_rng(SPLIT_SEED).uniform(0.0, 360.0, (n, ROT_COPIES))
    images = np.zeros((n, ROT_COPIES, 32, 32), np.uint8)
    for i, g in enumerate(grey):
        framed = Image.new("L", (32, 32))
        framed.paste(Image.fromarray(g).resize((24, 24), T.BILINEAR), (4, 4))
        for k, angle in enumerate(angles[i]):
            images[i, k] = np.asarray(framed.rotate(angle, resample=T.BILINEAR))
    # copy k of digit i is example i * ROT_COPIES + k: a split takes all copies of its digits
    copies = {name: (idx[:, None] * ROT_COPIES + np.arange(ROT_COPIES)).ravel()
              for name, idx in split.items()}
    return _rgb(images.reshape(n * ROT_COPIES, 32, 32)), np.repeat(labels, ROT_COPIES), copies


_BUILTIN = {"digits": _digits, "digits_rot": _digits_rot}


@functools.lru_cache(maxsize=None)
def _builtin_arrays(name: str):
    return _BUILTIN[name]()


def _resolve_builtin(s: Spec) -> Resolved:
    images, labels, split_idx = _builtin_arrays(s.name)
    src = ArraySource(images, labels)
    parts = {k: (src, split_idx[k]) for k in SPLITS}
    return Resolved(s, _info(s, [str(c) for c in range(10)], parts), parts)


# ----------------------------------------------------------------------------- tfds

def _resolve_tfds(s: Spec, root: Path) -> Resolved:
    where = root / s.tfds_name
    prepared = [p.parent for p in where.glob("*/dataset_info.json")] if where.is_dir() else []
    if not prepared:
        raise MissingInput(_missing(s, root, [where], "a prepared tfds data set"))
    if not any(p.glob("*.array_record*") for p in prepared):
        raise UserError(f"{s.title} in {where} is not in ArrayRecord format (tfds reads without TensorFlow "
                        f"only from ArrayRecord); prepare it again with: {prepare_command(s.name, root)}")
    sources = {}
    for ours, theirs in s.tfds_splits.items():
        if theirs is not None:
            try:
                sources[ours] = TfdsSource(s.tfds_name, str(root), theirs)
                len(sources[ours])
            except Exception as e:  # tfds raises many types; the user needs the path and the fix
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"cannot read split {theirs!r} of {s.title} in {where}: {first}; "
                                f"prepare it again with: {prepare_command(s.name, root)}") from None
    parts = {k: (src, np.arange(len(src))) for k, src in sources.items()}
    if "val" not in parts:
        train_src = sources["train"]
        kept, held = _carve(len(train_src), s.holdout)
        parts["train"], parts["val"] = (train_src, kept), (train_src, held)
    label = sources["train"].ds.dataset_info.features["label"]
    return Resolved(s, _info(s, label.names, parts), parts)


# ----------------------------------------------------------------------------- folders

def _images_under(d: Path) -> list[str]:
    """Image files anywhere below `d` (Tiny-ImageNet nests them in images/), sorted, hidden skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return out


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(d: Path) -> dict[str, list[str]] | None:
    """{class: files} of `<d>/<class>/**/*`; None when `d` holds no labelled images.

    A folder whose only subfolder is `images/` is unlabelled (Tiny-ImageNet's test/).
    """
    if not d.is_dir():
        return None
    subs = _subdirs(d)
    if [p.name for p in subs] == ["images"]:
        return None
    found = {p.name: _images_under(p) for p in subs}
    found = {k: v for k, v in found.items() if v}
    return found or None


def find_dir(s: Spec, root: Path) -> Path | None:
    wanted = {d.lower() for d in s.dirs}
    if root.name.lower() in wanted and root.is_dir():
        return root
    if root.is_dir():
        for p in _subdirs(root):
            if p.name.lower() in wanted:
                return p
    return None


def _missing(s: Spec, root: Path, looked: list[Path], what: str) -> str:
    paths = ", ".join(str(p) for p in looked)
    msg = f"{s.title} not found: looked for {what} in {paths}. Prepare it with: {prepare_command(s.name, root)}"
    return msg + (f" ({s.obtain.replace('ROOT', str(root))})" if s.obtain else "")


def _label(files_by_class: dict[str, list[str]], classes: list[str], where: Path) -> FileSource:
    unknown = sorted(set(files_by_class) - set(classes))
    if unknown:
        raise UserError(f"{where} has class folders absent from train/: {', '.join(unknown[:5])}; "
                        "every split must use the training classes")
    index = {c: i for i, c in enumerate(classes)}
    ordered = sorted(files_by_class)
    paths = [f for c in ordered for f in files_by_class[c]]
    labels = np.array([index[c] for c in ordered for _ in files_by_class[c]], np.int32)
    return FileSource(paths, labels)


def _resolve_split_folder(s: Spec, d: Path, root: Path) -> Resolved:
    for split_dir in _subdirs(d):
        if (split_dir / "val_annotations.txt").is_file() and (split_dir / "images").is_dir():
            raise UserError(f"{split_dir} is Tiny-ImageNet's validation set as downloaded (images/ plus "
                            f"val_annotations.txt); re-folder it by class with: {prepare_command(s.name, root)}")
    found = {k: _class_files(d / k) for k in SPLITS}
    if found["train"] is None:
        raise MissingInput(_missing(s, root, [d / "train"], "class folders of images"))
    classes = sorted(found["train"])
    src = {k: _label(v, classes, d / k) for k, v in found.items() if v is not None}
    train = src["train"]
    train_idx = np.arange(len(train))
    if "test" not in src and "val" in src:  # train/ + val/: the official val is the test split
        src["test"] = src.pop("val")
    if "test" in src:
        parts = {"test": (src["test"], np.arange(len(src["test"])))}
        holdout = s.holdout
    else:  # train/ only: 80/10/10
        train_idx, held = _carve(len(train), 0.1)
        parts = {"test": (train, held)}
        holdout = 1 / 9
    if "val" in src:
        parts["val"] = (src["val"], np.arange(len(src["val"])))
    else:
        kept, held = _carve(len(train_idx), holdout)
        parts["val"], train_idx = (train, train_idx[held]), train_idx[kept]
    parts["train"] = (train, train_idx)
    return Resolved(s, _info(s, classes, parts), parts)


def _resolve_pooled_folder(s: Spec, d: Path, root: Path) -> Resolved:
    by_class: dict[str, list[str]] = {}
    for domain in _subdirs(d):
        for c, files in (_class_files(domain) or {}).items():
            by_class.setdefault(c, []).extend(files)
    if not by_class:
        raise MissingInput(_missing(s, root, [d], "<domain>/<class>/ folders of images"))
    classes = sorted(by_class)
    src = _label(by_class, classes, d)
    n = len(src)
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    k = n // 10
    if k == 0:
        raise UserError(f"{d} holds only {n} images: too few for an 80/10/10 split")
    parts = {"test": (src, np.sort(perm[:k])), "val": (src, np.sort(perm[k:2 * k])),
             "train": (src, np.sort(perm[2 * k:]))}
    return Resolved(s, _info(s, classes, parts), parts)


def _resolve_folder(s: Spec, root: Path) -> Resolved:
    d = find_dir(s, root)
    if d is None:
        looked = [root / name for name in s.dirs]
        what = "<domain>/<class>/ image folders" if s.layout == "pooled" else "<split>/<class>/ image folders"
        raise MissingInput(_missing(s, root, looked, what))
    if s.layout == "pooled":
        return _resolve_pooled_folder(s, d, root)
    return _resolve_split_folder(s, d, root)


@functools.lru_cache(maxsize=32)
def _resolve(name: str, root: str | None) -> Resolved:
    s = spec(name)
    if s.kind == "builtin":
        return _resolve_builtin(s)
    if root is None:
        raise MissingInput(f"data set {name!r} needs a root folder (data.root in the config, --root on the "
                        f"command line); it is prepared there with: {prepare_command(name, 'DIR')}")
    path = Path(root).expanduser()
    return _resolve_tfds(s, path) if s.kind == "tfds" else _resolve_folder(s, path)


def resolve(name: str, root) -> Resolved:
    """The data set `name` under `root`, its splits and info; UserError when it is not there."""
    # a built-in data set ignores root: one cache entry, whatever root a caller passes
    builtin = name in SPECS and SPECS[name].kind == "builtin"
    return _resolve(name, None if builtin or root is None else str(root))


def describe(name: str, root) -> DatasetInfo:
    """Classes, image size and split sizes of `name` under `root` (ignored when built in)."""
    return resolve(name, root).info


def clear_cache() -> None:
    """Forget cached folder scans (after files were added, moved or prepared in this process)."""
    _resolve.cache_clear()
