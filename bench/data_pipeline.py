"""Is the input pipeline ever the bottleneck? Images/s of each pipeline alone against the train step.

    python bench/data_pipeline.py [--batch 64] [--rounds 3]

Cases: digits (embedded, 32 px); a generated Tiny-ImageNet-style image folder (64 px JPEGs,
flip); a generated PACS-style folder (~375x500 JPEGs to 224 px: random-resized crop, flip,
colour jitter); a generated cifar10 set in tfds's ArrayRecord format (32 px PNGs, shift + flip).
Timed by `jaxprune.measure` (each side of each round in a fresh process, the sides
alternating): a pipeline side is one whole training epoch (default worker count, start-up
included), the step side is `Trainer`'s train step of resnet18_cifar without statistics at
the same image size and batch, data parallel over one XLA host device per core. The last
lines are one JSON object per case.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxprune.measure import Workload, measure  # noqa: E402
from tests import tfds_fixture as synthetic  # noqa: E402


def textured(rng, h: int, w: int) -> np.ndarray:
    """A photo-like image: smooth colour blobs plus grain, so JPEG/PNG sizes and decode cost are realistic."""
    blobs = Image.fromarray(rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8))
    base = np.asarray(blobs.resize((w, h), Image.Resampling.BICUBIC), np.float32)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def make_folder64(root: Path, rng, classes: int = 10, per_class: int = 200) -> None:
    d = root / "tiny-imagenet-200"
    for c in range(classes):
        for k in range(per_class):
            for split, n in (("train", per_class), ("val", per_class // 10)):
                if k < n:
                    path = d / split / f"n{c:08d}" / (f"images/{k}.JPEG" if split == "train" else f"{k}.JPEG")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(textured(rng, 64, 64)).save(path, quality=90)


def make_folder224(root: Path, rng, per_class: int = 75) -> None:
    for domain in ("photo", "sketch"):
        for c in ("dog", "horse", "house", "person"):
            d = root / "PACS" / domain / c
            d.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                Image.fromarray(textured(rng, 375, 500)).save(d / f"{k}.jpg", quality=90)


def make_tfds(root: Path, rng, n: int = 2000) -> None:
    def examples(m):
        return [(synthetic.encode(textured(rng, 32, 32)), int(rng.integers(10))) for _ in range(m)]
    synthetic.write_tfds("cifar10", root, {"train": examples(n), "test": examples(100)})


def make_epoch(name: str, root: str | None, batch: int, size: int):
    """A `jaxprune.measure` workload: one whole training epoch of the pipeline, start-up
    included (a fresh loader each call)."""
    from jaxprune import data

    def epoch():
        for _ in data.loader(name, root, "train", batch_size=batch, seed=0, train=True,
                             image_size=size):
            pass
    return epoch


def epoch_images(name: str, root, batch: int, size: int) -> tuple[int, int]:
    """(images in one training epoch, the loader's worker count)."""
    from jaxprune import data
    it = data.loader(name, root, "train", batch_size=batch, seed=0, train=True, image_size=size)
    return len(it) * batch, it.num_workers


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_folder64(tmp, rng)
        make_folder224(tmp, rng)
        make_tfds(tmp, rng)
        print(f"generated data sets in {time.perf_counter() - t0:.1f} s", flush=True)
        cases = [("digits", "digits", None, 32), ("folder_64px", "tiny_imagenet", str(tmp), 64),
                 ("folder_224px_aug", "pacs", str(tmp), 224),
                 ("tfds_array_record", "cifar10", str(tmp), 32)]
        pipes = [Workload(case, "jax", "bench.data_pipeline:make_epoch",
                          {"name": name, "root": root, "batch": args.batch, "size": size})
                 for case, name, root, size in cases]
        sizes = sorted({size for *_, size in cases})  # the step does not depend on the pixels' source
        steps = [Workload(f"step {size}", "jax", "jaxprune.measure.workloads:jax_train_step",
                          {"arch": "resnet18_cifar", "options": {}, "num_classes": 10,
                           "batch": args.batch, "input_size": [size, size], "entropy": False})
                 for size in sizes]
        # An epoch is timed from its first batch (a loader's start is part of its cost); a
        # step only once compiled and warm, as it runs for the rest of training.
        t = measure(pipes, rounds=args.rounds, warmup=0, repeats=1)
        t.timings.update(measure(steps, rounds=args.rounds, warmup=2, repeats=3).timings)
        for case, name, root, size in cases:
            images, workers = epoch_images(name, root, args.batch, size)
            pipe, step = t[case], t[f"step {size}"]
            r = {"case": case, "dataset": name, "image_size": size, "batch": args.batch,
                 "num_workers": workers, "epoch_images": images,
                 "pipeline_images_per_s": images / (pipe.median_ms / 1e3),
                 "train_step_images_per_s": args.batch / (step.median_ms / 1e3),
                 "devices": step.threads}
            r["pipeline_over_step"] = r["pipeline_images_per_s"] / r["train_step_images_per_s"]
            r["pipeline_is_bottleneck"] = r["pipeline_over_step"] < 1.0
            results.append(r)
            print(f"{case:18s} {size:4d} px  pipeline {r['pipeline_images_per_s']:8.0f} img/s "
                  f"({workers} workers)  train step {r['train_step_images_per_s']:7.1f} img/s  "
                  f"ratio {r['pipeline_over_step']:7.1f}", flush=True)
    for r in results:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
