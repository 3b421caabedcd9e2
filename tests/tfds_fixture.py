"""Test fixture: small data sets in the real on-disk formats, without downloads (tests, benchmarks).

`write_tfds("cifar10", root, {"train": [(png_bytes, label), ...], ...})` runs tfds's own
builder for that data set, with only its download step replaced by the examples given:
the ArrayRecord files, `dataset_info.json` and `features.json` are what
`python -m jaxprune.data prepare` would write. Images are passed already encoded, so
this needs no TensorFlow.
"""
from __future__ import annotations

import io
from unittest import mock

import numpy as np
from PIL import Image

from jaxprune.data.sources import clear_cache, spec


def encode(img: np.ndarray | Image.Image, fmt: str = "PNG", quality: int = 90) -> bytes:
    img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def write_tfds(name: str, root, splits: dict[str, list[tuple[bytes, int]]]) -> None:
    """Prepare the tfds data set `name` (a jaxprune name) under `root` from encoded examples."""
    import tensorflow_datasets as tfds

    tfds_name = spec(name).tfds_name
    builder_cls = tfds.builder_cls(tfds_name)

    def fill(features, key, image, label):
        out = {}
        for k, f in features.items():
            if isinstance(f, tfds.features.Image):
                out[k] = image
            elif isinstance(f, tfds.features.ClassLabel):
                out[k] = label
            elif isinstance(f, tfds.features.Text):
                out[k] = key
            else:
                raise ValueError(f"write_tfds cannot fill feature {k!r} ({type(f).__name__}) of {tfds_name}")
        return out

    def generators(self, dl_manager):
        features = self.info.features
        return {split: ((f"{split}_{i}", fill(features, f"{split}_{i}", img, lab))
                        for i, (img, lab) in enumerate(examples))
                for split, examples in splits.items()}

    tfds.disable_progress_bar()  # a few examples: bars are noise
    with mock.patch.object(builder_cls, "_split_generators", generators):
        tfds.builder(tfds_name, data_dir=str(root)).download_and_prepare(file_format="array_record")
    clear_cache()
