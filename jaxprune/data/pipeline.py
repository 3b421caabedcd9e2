"""One epoch of batches on grain: shuffle, shard by process, decode, augment, batch, normalize.

Order of operations over the `N` examples of a split, for a global batch `B`
and `P` processes (process `p` gets `b = B // P` rows per batch):

1. positions `0..N-1`, shuffled (train) with a seed from `(seed, epoch)`;
2. cut to whole global batches (`drop_remainder`) or padded up to them with
   placeholder rows (mask 0);
3. each example read and transformed; a train example's randomness comes from
   `(seed, epoch)` and its position in the *global* order, so it does not depend
   on the worker count nor on the process count;
4. process `p` keeps every P-th position from `p` (disjoint, equal lengths), and
   batches its rows; normalization (and MixUp/CutMix) run per batch.

Every batch is `{"image": float32 (b,H,W,3), "label": int32 (b,) or float32
(b, classes) soft targets with MixUp/CutMix, "mask": float32 (b,)}`. `mask` is 1
for real examples, 0 for the padding rows that fill the last batch when
`drop_remainder` is off: shapes stay fixed (one compile, any device count,
every process the same), and metrics must weight by `mask`.
"""
from __future__ import annotations

import dataclasses
import os

import grain
import numpy as np

from jaxprune.data import transforms as T
from jaxprune.data.sources import SPLITS, DatasetInfo, resolve
from jaxprune.errors import UserError


def _seed(*words: int) -> int:
    """A 32-bit seed mixed from several ints (run seed, epoch, stream, ...)."""
    return int(np.random.SeedSequence([w & 0xFFFFFFFF for w in words]).generate_state(1)[0])


# Starting a grain worker (a spawned interpreter importing numpy, PIL, jax, tfds) takes
# seconds: about what one core needs to decode and augment this many 224x224 images.
STARTUP_IMAGES_224 = 2048


def default_workers(examples: int, size: tuple[int, int], in_memory: bool) -> int:
    """Worker processes: one per core available, fewer when this process's epoch is too short to
    pay for their start-up (its work counted in 224-px images); none for in-memory arrays."""
    if in_memory:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    work = examples * size[0] * size[1] / (224 * 224)
    return int(min(cores, work // STARTUP_IMAGES_224))


@dataclasses.dataclass(frozen=True, eq=False)
class _Example:
    """Position in the split -> one transformed example (uint8); position -1 -> a padding row."""
    source: object
    indices: np.ndarray
    ops: tuple
    size: tuple[int, int]

    def __call__(self, pos, rng=None) -> dict:
        if pos < 0:
            return {"image": np.zeros((*self.size, 3), np.uint8), "label": np.int32(0), "mask": np.float32(0)}
        x, label = self.source[int(self.indices[pos])]
        img = T.open_image(x, T.draft_size(self.ops))
        for op in self.ops:
            img = op(img, rng)
        return {"image": T.to_array(img, self.size), "label": np.int32(label), "mask": np.float32(1)}


@dataclasses.dataclass(frozen=True)
class _Finish:
    """Per batch: normalize, then MixUp/CutMix when asked (called with an rng only then)."""
    mean: tuple
    std: tuple
    num_classes: int
    mixup: float
    cutmix: float

    def __call__(self, batch, rng=None) -> dict:
        batch = {**batch, "image": T.normalize(batch["image"], self.mean, self.std)}
        return batch if rng is None else T.mix(batch, rng, self.num_classes, self.mixup, self.cutmix)


class Loader:
    """One epoch of per-process batches; iterate it (again, for the same batches); `len` = batches."""

    def __init__(self, ds: grain.MapDataset, info: DatasetInfo, num_workers: int):
        self._ds, self.info, self.num_workers = ds, info, num_workers

    def __len__(self) -> int:
        return len(self._ds)

    def __iter__(self):
        if self.num_workers > 0:
            from absl import flags
            if not flags.FLAGS.is_parsed():
                # grain's worker start-up reads its absl flags, which only an absl.app main parses;
                # their defaults are what we want
                flags.FLAGS.mark_as_parsed()
            # processes decode whole batches; each keeps at most 2 ready
            it_ds = self._ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers,
                                                                   per_worker_buffer_size=2))
        else:
            it_ds = self._ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        it = iter(it_ds)
        try:
            for batch in it:
                # worker batches arrive in shared memory that grain frees when the array dies;
                # an owned copy can outlive it (a CPU jax array may alias host memory)
                yield {k: np.array(v) for k, v in batch.items()} if self.num_workers else batch
        finally:
            if hasattr(it, "close"):
                it.close()


def _image_size(image_size, info: DatasetInfo) -> tuple[int, int]:
    if image_size is None:
        return info.image_size
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 8:
        raise UserError(f"image_size must be an int or (height, width) of at least 8, got {image_size!r}")
    return size


def loader(name, root, split, *, batch_size, seed, epoch=0, train, image_size=None,
           process_index=None, process_count=None, num_workers=None, drop_remainder=None,
           mixup=0.0, cutmix=0.0) -> Loader:
    """Batches of one epoch of `split` for this process (see the module docstring)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    res = resolve(name, root)
    info = res.info
    if process_count is None or process_index is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is outside 0..{process_count - 1}")
    if batch_size < 1 or batch_size % process_count:
        raise UserError(f"batch_size {batch_size} must be a positive multiple of the process count "
                        f"{process_count} (it is the global batch)")
    if mixup < 0 or cutmix < 0:
        raise UserError(f"mixup and cutmix are Beta(a, a) parameters >= 0, got {mixup} and {cutmix}")
    size = _image_size(image_size, info)
    drop = train if drop_remainder is None else drop_remainder
    source, indices = res.parts[split]
    n = len(indices)
    batches = n // batch_size if drop else -(-n // batch_size)
    if batches == 0:
        raise UserError(f"{name} {split} has {n} examples, fewer than one batch of {batch_size}; "
                        "lower the batch size")

    ops = res.spec.train_ops(size) if train else res.spec.eval_ops(size)
    example = _Example(source, indices, ops, size)
    ids = grain.MapDataset.range(n)
    if train:
        ids = ids.shuffle(seed=_seed(seed, epoch, 0))
    total = batches * batch_size
    if total < n:
        ids = ids.slice(slice(0, total))
    elif total > n:
        ids = grain.MapDataset.concatenate([ids, grain.MapDataset.source([-1] * (total - n))])
    ds = ids.random_map(example, seed=_seed(seed, epoch, 1)) if train else ids.map(example)
    ds = ds.slice(slice(process_index, None, process_count)).batch(batch_size // process_count)
    finish = _Finish(info.mean, info.std, info.num_classes, mixup, cutmix)
    if train and (mixup > 0 or cutmix > 0):
        ds = ds.random_map(finish, seed=_seed(seed, epoch, 2, process_index))
    else:
        ds = ds.map(finish)
    if num_workers is None:
        workers = default_workers(total // process_count, size, res.spec.kind == "builtin")
    else:
        workers = num_workers
    if workers < 0:
        raise UserError(f"num_workers must be >= 0, got {workers}")
    return Loader(ds, info, workers)


def to_global(batch: dict, mesh) -> dict:
    """A per-process numpy batch -> global jax arrays on `mesh`, batch axis sharded over 'data'."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if "data" not in mesh.axis_names:
        raise UserError(f"to_global needs a mesh with a 'data' axis, got axes {mesh.axis_names}")
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    rows = {len(x) for x in jax.tree.leaves(batch)}
    if len(rows) != 1 or rows.pop() % local:
        raise UserError(f"a batch of {[len(x) for x in jax.tree.leaves(batch)]} rows per process does not "
                        f"split over this process's {local} devices; use a per-process batch size that "
                        f"is a multiple of {local}")
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
