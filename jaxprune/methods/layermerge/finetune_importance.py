"""`importance: finetune`: the papers' importance table, each entry a short finetune
(ECDC, Kim et al., ICML 2023, Sec. 4.2 and App. B; LayerMerge, Kim et al., ICML 2024,
Sec. 4, the same protocol over its options).

For every *key* the network is changed as if segment (i, j) were the only merged piece
of a plan:

* every activation strictly inside (i, j) is removed (linearized);
* the activation at i and at j is as the key says (at a MobileNetV2 block end, a_i / a_j
  decide whether a ReLU6 is inserted there; elsewhere it is the site's own, always on);
* with layer dropping, the convs the key's option drops are removed (`space.drop_conv`);
* every other activation and conv is the original's;
* a one-conv segment (j = i + 1) has that conv and its BatchNorm re-initialised, so its
  "unchanged" entries measure what losing the layer costs (the reference does the same).

The changed network is finetuned from the original weights for `epochs` epochs (the run's
`train` optimizer and schedule, at learning rate `lr` when given), each epoch on the whole
training set or, with `images`, on the first `images` of its shuffled order (rounded up to
whole batches; the same images for every entry: LayerMerge finetunes on a fixed 50k subset
of ImageNet-train, ECDC on the whole of it), and the entry is its validation accuracy
minus the original's, in points (Δacc; the validation split is held out of the training
data).
The keys are the references':

* ECDC (`exclude_zeros`), (i, j, a_i, a_j): (1, 1) for every segment; for a segment not
  starting at 0, also (0, 1) when i is a block end, or else (1, 0) when j is one: 315 keys
  for MobileNetV2's 171 segments, as the reference's, and 22 for ResNet-18's 22.
* LayerMerge, (i, j, option, a_i, a_j): one per option, its flags fixed: a_i the
  original's (0 at a MobileNetV2 block end), a_j as the space's (`ModelSpace.end_acts`: a
  ReLU6 after a block end closing two or more convs): 391 keys for MobileNetV2, 30 for
  ResNet-18.

Normalisation:

* ECDC's `single`: I = Δacc − α · mean(Δacc over the one-conv entries). The mean is
  negative, so each segment of a plan earns a bonus α·|mean|; that bonus is what keeps the
  search from merging everything (α: 1.6 for MobileNetV2-1.0, 1.2 for 1.4).
* LayerMerge's: I = exp(Δacc / 100), positive and about 1 per segment (the same role).
  An option's value holds for every flag a_i the search may arrive with.

Every activation change is a mask (the ReLU6s of the block ends are inserted once, off),
so every entry of one set of dropped convs runs one compiled train step; the keys are
taken set by set (ECDC's: one set, no drops). Finished entries are written to
`importance.json` in the run folder as they come, and a rerun continues after them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import distributed
from jaxprune.context import RunContext
from jaxprune.errors import UserError
from jaxprune.methods.layermerge.space import INSERTED_ACT, ModelSpace, conv_bn, drop_conv
from jaxprune.train import Trainer, fit
from models.layers import Act
from models.net import Net

SCHEMA = "jaxprune.layermerge.importance/1"
FILE = "importance.json"


def keys(ms: ModelSpace) -> list[tuple]:
    """The measured keys in (i, j) order (see the module doc): (i, j, a_i, a_j), or with
    layer dropping (i, j, option, a_i, a_j)."""
    space, out = ms.space, []
    if ms.drop_layers:
        return [(i, j, o, min(space.acts(i)), ms.end_acts(i, j)[0]) for i, j, o in ms.entries()]
    for i, j in ms.segments:
        for ai in space.acts(i):
            for aj in space.acts(j):
                if (ai, aj) == (1, 1) or (i > 0 and (ai, aj) == (0, 1)) or (
                        i > 0 and (ai, aj) == (1, 0) and i not in space.act_free):
                    out.append((i, j, ai, aj))
    return out


def single_mean(delta: dict[tuple, float]) -> float | None:
    """Mean Δacc of the one-conv entries (j = i + 1); None without any."""
    singles = [v for (i, j, _, _), v in delta.items() if j == i + 1]
    return float(np.mean(singles)) if singles else None


def normalize(delta: dict[tuple, float], alpha: float) -> dict[tuple, float]:
    """ECDC's `single` normalisation: Δacc − α · mean(Δacc of the one-conv entries)."""
    shift = alpha * (single_mean(delta) or 0.0)
    return {k: v - shift for k, v in delta.items()}


def normalize_options(ms: ModelSpace, delta: dict[tuple, float]) -> dict[tuple, float]:
    """LayerMerge's normalisation, exp(Δacc / 100), of keys (i, j, option, a_i, a_j),
    keyed for `dp.solve` by every flag the search may take (`ModelSpace.act_keys`)."""
    return {key: float(np.exp(v / 100.0))
            for (i, j, o, _, _), v in delta.items() for key in ms.act_keys(i, j, o)}


class _Probe:
    """The original network with a ReLU6 inserted (off) at every free block end, and what
    one key changes in it: the convs its option drops, masks, and a fresh conv + BatchNorm
    for one-conv segments. `m` is the network of the last key set."""

    def __init__(self, original: Net, ms: ModelSpace, seed: int):
        import models
        self.ms, self.base = ms, nnx.clone(original)
        self.inserted = {}
        for p, (after, name) in ms.free_after.items():
            self.base.insert_after(after, name, Act(INSERTED_ACT))
            self.inserted[p] = name
        spec = original.spec
        self.fresh = models.create(spec.arch, num_classes=spec.num_classes, seed=seed + 1,
                                   **dict(spec.options))
        self.m = self._pristine = self._dropped = None

    def dropped(self, key: tuple) -> tuple[str, ...]:
        """The convs `key`'s option drops (none for ECDC's keys)."""
        return self.ms.dropped(key[0], key[1], key[2]) if len(key) == 5 else ()

    def _mask(self, name: str, on: bool) -> None:
        layer = self.m.layers[name]
        layer.mask.value = jnp.full_like(layer.mask.value, float(on))

    def set(self, key: tuple) -> bool:
        """Make `m` the network of `key`; True when it is a new network (other convs
        dropped than the last key's: a train step of its own), else `m` is reset in place."""
        i, j, ai, aj = key[0], key[1], key[-2], key[-1]
        drop = self.dropped(key)
        new = self.m is None or drop != self._dropped
        if new:
            self.m, self._dropped = nnx.clone(self.base), drop
            for conv in drop:
                drop_conv(self.m, conv)
            self._pristine = nnx.clone(self.m)  # a copy: a state of m would share its variables
        nnx.update(self.m, nnx.state(self._pristine))
        inside = {p.site for p in self.ms.positions[i + 1:j] if p.site}
        for s in self.m.sites():
            self._mask(s, s not in inside)
        for p, name in self.inserted.items():
            self._mask(name, (p == i and ai == 1) or (p == j and aj == 1))
        if j == i + 1:
            conv = self.ms.positions[j].conv
            for name in filter(None, (conv, conv_bn(self.m, conv))):
                nnx.update(self.m.layers[name], nnx.state(self.fresh.layers[name]))
        return new


def _key_text(k) -> str:
    return ",".join(map(str, k))


def _load(path: Path, header: dict) -> dict[str, float]:
    """The entries of an earlier attempt of this run, when made with the same settings."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    fields = [*header, *(k for k in data if k not in header and k != "delta")]
    differ = [f"{k} {data.get(k)!r} (here {header.get(k)!r})" for k in fields
              if data.get(k) != header.get(k)]
    if differ:
        raise UserError(f"{path} holds importance entries made with other settings "
                        f"({'; '.join(differ)}): use a new run name, or delete the file to "
                        "measure them again")
    return dict(data["delta"])


def finetune_importance(ctx: RunContext, original: Net, ms: ModelSpace, base_val_acc: float,
                        *, epochs: int, images: int | None = None, lr: float | None = None,
                        alpha: float) -> tuple[dict[tuple, float], dict]:
    """The importance table of `ms` (see the module doc) and a summary for results.json
    (the raw Δacc and the importance per key, the baseline, the normalisation, the steps
    and images of each epoch). ECDC's space: {(i, j, a_i, a_j): I} for
    `dp.extend_importance`, normalised with `alpha`; LayerMerge's: {(i, j, option, a_i,
    a_j): I} for `dp.solve` (`alpha` unused). `base_val_acc`: the original's validation
    accuracy (%); `images`: per epoch of each entry (None: the whole training set); `lr`:
    the finetunes' learning rate (None: the run's `train.lr`)."""
    path = ctx.run_dir / FILE
    steps = ctx.data.steps_per_epoch()
    if images is not None:
        steps = min(steps, -(-images // ctx.data.batch_size))
    run_train = dataclasses.replace(ctx.cfg.train, lr=lr or ctx.cfg.train.lr)
    # as the file holds it (tuples as lists); a subset is recorded only when there is one,
    # so files of whole-epoch entries read the same as before the option existed
    header = json.loads(json.dumps(
        {"schema": SCHEMA, "space_hash": ms.hash, "epochs": epochs,
         **({"steps_per_epoch": steps} if steps < ctx.data.steps_per_epoch() else {}),
         "train": dataclasses.asdict(run_train), "base_val_acc": base_val_acc}))
    train = dataclasses.replace(run_train, epochs=epochs)
    done = _load(path, header)
    todo = keys(ms)
    probe = _Probe(original, ms, ctx.cfg.seed)
    # set by set of dropped convs, each set one compiled step (stable: (i, j) order within)
    left = sorted((k for k in todo if _key_text(k) not in done), key=probe.dropped)
    if left:
        ctx.log(f"layermerge: finetuning {len(left)} of {len(todo)} importance entries "
                f"({epochs} epoch(s) of {steps} steps each) ...")
    trainer = None
    for n, k in enumerate(left):
        if probe.set(k):
            trainer = Trainer(probe.m, train, steps_per_epoch=steps, mesh=ctx.mesh)
        trainer.start_round()
        fit(trainer, ctx.data, epochs, tag={"importance": f"{n + 1}/{len(left)}"},
            epoch_offset=ctx.cfg.method.pretrain_epochs)
        acc = trainer.evaluate(ctx.data.eval_batches("val"))["acc"]
        done[_key_text(k)] = float(acc - base_val_acc)
        if distributed.is_main():
            path.write_text(json.dumps({**header, "delta": done}, indent=1) + "\n")
    delta = {k: done[_key_text(k)] for k in todo}
    if ms.drop_layers:
        importance, norm = normalize_options(ms, delta), {"normalisation": "exp"}
    else:
        importance = normalize(delta, alpha)
        norm = {"normalisation": "single", "alpha": alpha, "single_mean": single_mean(delta)}
    return importance, {"entries": len(todo), "epochs": epochs, "lr": train.lr,
                        "steps_per_epoch": steps,
                        "images_per_epoch": steps * ctx.data.batch_size, **norm,
                        "base_val_acc": base_val_acc,
                        "delta": {_key_text(k): v for k, v in delta.items()},
                        "importance": {_key_text(k): v for k, v in importance.items()},
                        "file": str(path)}
