"""Is the input pipeline ever the bottleneck? Images/s of each pipeline alone against the train step.

    python bench/data_pipeline.py [--batch 64] [--max-steps 3]

Cases: digits (embedded, 32 px); a generated Tiny-ImageNet-style image folder (64 px JPEGs,
flip); a generated PACS-style folder (~375x500 JPEGs to 224 px: random-resized crop, flip,
colour jitter); a generated cifar10 set in tfds's ArrayRecord format (32 px PNGs, shift + flip).
Each pipeline runs one training epoch alone (default worker count, start-up included); the
train step is `models.create("resnet18_cifar", num_classes=10)` with a plain jitted SGD step on
softmax cross-entropy at the same image size and batch, data-parallel over this machine's
cores as host devices, batches placed with `data.to_global`. The last lines are one JSON
object per case.
"""
from __future__ import annotations

import os

# One XLA host device per core (DESIGN.md §2: one device does not keep two cores busy).
_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_cores}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
from jaxprune import data  # noqa: E402
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


class TrainStep:
    """resnet18_cifar, SGD(0.1) on cross-entropy, data-parallel over a ('data',) mesh of all devices."""

    def __init__(self, mesh):
        model = models.create("resnet18_cifar", num_classes=10)
        model.train()
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.params, self.rest = jax.device_put((params, rest), replicated)
        graphdef = self.graphdef

        def loss_fn(params, rest, x, y):
            m = nnx.merge(graphdef, params, rest, copy=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
            return loss, nnx.state(m, nnx.Not(nnx.Param))  # updated BatchNorm statistics

        @jax.jit
        def step(params, rest, x, y):
            (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y)
            return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), rest, loss

        self._step = step

    def __call__(self, batch):
        self.params, self.rest, loss = self._step(self.params, self.rest, batch["image"], batch["label"])
        return loss


def time_pipeline(name, root, batch, size) -> dict:
    it = data.loader(name, root, "train", batch_size=batch, seed=0, train=True, image_size=size)
    t0 = time.perf_counter()
    first, n = None, 0
    for b in it:
        n += int(b["mask"].sum())
        first = first or time.perf_counter() - t0
    elapsed = time.perf_counter() - t0
    return {"pipeline_images_per_s": n / elapsed, "first_batch_s": first, "epoch_images": n,
            "num_workers": it.num_workers}


def time_train_step(step: TrainStep, batch: dict, max_steps: int, min_seconds: float = 5.0) -> dict:
    t0 = time.perf_counter()
    jax.block_until_ready(step(batch))  # compile
    compile_s = time.perf_counter() - t0
    times = []
    while len(times) < max_steps and (not times or sum(times) < min_seconds):
        t0 = time.perf_counter()
        jax.block_until_ready(step(batch))
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    return {"train_step_s": step_s, "train_step_images_per_s": len(batch["label"]) / step_s,
            "compile_s": compile_s, "steps_timed": len(times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=3)
    args = parser.parse_args()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    rng = np.random.default_rng(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_folder64(tmp, rng)
        make_folder224(tmp, rng)
        make_tfds(tmp, rng)
        print(f"generated data sets in {time.perf_counter() - t0:.1f} s", flush=True)
        cases = [("digits", "digits", None, 32), ("folder_64px", "tiny_imagenet", tmp, 64),
                 ("folder_224px_aug", "pacs", tmp, 224), ("tfds_array_record", "cifar10", tmp, 32)]
        steps: dict[int, dict] = {}
        step = TrainStep(mesh)
        for case, name, root, size in cases:
            pipe = time_pipeline(name, root, args.batch, size)
            if size not in steps:  # the step does not depend on where the pixels came from
                batch = next(iter(data.loader(name, root, "train", batch_size=args.batch, seed=0,
                                              train=True, image_size=size)))
                steps[size] = time_train_step(step, data.to_global(batch, mesh), args.max_steps)
            r = {"case": case, "dataset": name, "image_size": size, "batch": args.batch,
                 "devices": jax.device_count(), **pipe, **steps[size]}
            r["pipeline_over_step"] = r["pipeline_images_per_s"] / r["train_step_images_per_s"]
            r["pipeline_is_bottleneck"] = r["pipeline_over_step"] < 1.0
            results.append(r)
            print(f"{case:18s} {size:4d} px  pipeline {r['pipeline_images_per_s']:8.0f} img/s "
                  f"({r['num_workers']} workers)  train step {r['train_step_images_per_s']:7.1f} img/s  "
                  f"ratio {r['pipeline_over_step']:7.1f}", flush=True)
    for r in results:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
