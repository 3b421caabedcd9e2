"""`prepare(name, root)`: put a data set on disk once, in the layout the loaders read.

* tfds data sets: `tfds.builder(...).download_and_prepare(file_format="array_record")`.
  Writing needs TensorFlow (image encoding); reading afterwards does not.
  ImageNet cannot be downloaded by tfds: its tar files go in `ROOT/downloads/manual`.
* image folders: download the archive (or take `archive=`, a local file or URL),
  unpack it under `root`, then fix the layout where the release differs from
  `<split>/<class>/`: Tiny-ImageNet's `val/images` is re-foldered by class from
  `val_annotations.txt`; FGVC-Aircraft's `data/images` is linked into
  `train|val|test/<variant>/` from its `images_variant_*.txt` lists.
Each step is idempotent: running `prepare` again finishes an interrupted run.
"""
from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path

from jaxprune.data.sources import Spec, clear_cache, find_dir, prepare_command, resolve, spec
from jaxprune.errors import UserError


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _prepare_tfds(s: Spec, root: Path, archive) -> None:
    if archive is not None:
        raise UserError(f"{s.name} is a tfds data set: tfds downloads it itself, --archive does not apply")
    try:
        import tensorflow  # noqa: F401  (tfds needs it to encode the images it writes)
    except ImportError:
        raise UserError(f"preparing {s.title} needs TensorFlow on this machine, once: pip install "
                        "tensorflow-cpu (reading the prepared data does not need it)") from None
    import tensorflow_datasets as tfds
    manual = root / "downloads" / "manual"
    builder = tfds.builder(s.tfds_name, data_dir=str(root))
    try:
        builder.download_and_prepare(file_format="array_record",
                                     download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    except Exception as e:  # network, checksum, manual files: one line naming what failed
        hint = f" ({s.obtain.replace('ROOT', str(root))})" if s.obtain else ""
        raise UserError(f"preparing {s.title} in {root} failed: {_first_line(e)}{hint}") from None


def _fetch(src: str, downloads: Path) -> Path:
    """A local archive as is; a URL downloaded into `downloads/` (kept, so a rerun does not fetch again)."""
    if Path(src).expanduser().is_file():
        return Path(src).expanduser()
    if "://" not in src:
        raise UserError(f"archive {src} does not exist")
    downloads.mkdir(parents=True, exist_ok=True)
    dest = downloads / src.rstrip("/").rsplit("/", 1)[-1]
    if not dest.is_file():
        print(f"downloading {src} -> {dest}")
        part = dest.with_name(dest.name + ".part")
        try:
            urllib.request.urlretrieve(src, part)
        except OSError as e:
            raise UserError(f"cannot download {src}: {_first_line(e)}; fetch it by hand and pass "
                            "--archive FILE") from None
        part.rename(dest)
    return dest


def _refolder_tiny_val(d: Path) -> None:
    """val/images/*.JPEG -> val/<wnid>/*.JPEG, the class read from val/val_annotations.txt."""
    val, images = d / "val", d / "val" / "images"
    notes = val / "val_annotations.txt"
    if not (notes.is_file() and images.is_dir()):
        return
    for line in notes.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and (images / fields[0]).is_file():
            (val / fields[1]).mkdir(exist_ok=True)
            (images / fields[0]).rename(val / fields[1] / fields[0])
    left = sorted(p.name for p in images.iterdir())
    if left:
        raise UserError(f"{len(left)} files in {images} are not listed in {notes} (e.g. {left[0]}); "
                        "the download looks incomplete: delete it and prepare again")
    images.rmdir()


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links there
        shutil.copy2(src, dst)


def _split_aircraft(d: Path) -> None:
    """data/images/<id>.jpg -> <split>/<variant>/<id>.jpg from data/images_variant_<split>.txt."""
    data = d / "data"
    for split in ("train", "val", "test"):
        listing = data / f"images_variant_{split}.txt"
        if (d / split).is_dir() or not listing.is_file():
            continue
        tmp = d / f"{split}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        for line in listing.read_text().splitlines():
            if not line.strip():
                continue
            image_id, variant = line.strip().split(" ", 1)
            cls = tmp / variant.replace("/", "-")  # e.g. "F-16A/B"
            cls.mkdir(parents=True, exist_ok=True)
            src = data / "images" / f"{image_id}.jpg"
            if not src.is_file():
                raise UserError(f"{src} is listed in {listing} but missing; the download looks "
                                "incomplete: delete it and prepare again")
            _link(src, cls / src.name)
        tmp.rename(d / split)  # only a complete split gets its final name


_FIXUPS = {"tiny_imagenet": _refolder_tiny_val, "aircraft": _split_aircraft}


def _prepare_folder(s: Spec, root: Path, archive) -> None:
    d = find_dir(s, root)
    if d is None or archive is not None:
        src = archive or s.url
        if src is None:
            raise UserError(f"{s.title} is not in {root} and has no public download; pass it with "
                            f"{prepare_command(s.name, root)} ({s.obtain})")
        path = _fetch(str(src), root / "downloads")
        print(f"unpacking {path} into {root}")
        try:
            shutil.unpack_archive(path, root)
        except (shutil.ReadError, ValueError, OSError) as e:
            raise UserError(f"cannot unpack {path}: {_first_line(e)}") from None
        d = find_dir(s, root)
        if d is None:
            raise UserError(f"{path} did not unpack to a folder named {' or '.join(s.dirs)} in {root}")
    _FIXUPS.get(s.name, lambda d: None)(d)


def prepare(name: str, root, archive=None) -> str:
    """Prepare `name` under `root` (see the module docstring); returns a one-line summary."""
    s = spec(name)
    if s.kind == "builtin":
        return f"{name} is built from scikit-learn's digits: nothing to prepare"
    if root is None:
        raise UserError(f"preparing {name} needs --root DIR, the folder that will hold it")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    if s.kind == "tfds":
        _prepare_tfds(s, root, archive)
    else:
        _prepare_folder(s, root, archive)
    clear_cache()
    info = resolve(name, root).info
    sizes = ", ".join(f"{k} {v}" for k, v in info.splits.items())
    return f"{s.title} ready under {root}: {info.num_classes} classes; {sizes}"
