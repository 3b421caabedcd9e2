"""`importance: finetune`: ECDC's importance table, each entry a short finetune
(Kim et al., ICML 2023, Sec. 4.2 and App. B; the same protocol in LayerMerge).

For every *key* (i, j, a_i, a_j) the network is changed as if segment (i, j) were the
only merged piece of a plan:

* every activation strictly inside (i, j) is removed (linearized);
* the activation at i and at j is as the key says (at a MobileNetV2 block end, a_i / a_j
  decide whether a ReLU6 is inserted there; elsewhere it is the site's own, always on);
* every other activation is the original's;
* a one-conv segment (j = i + 1) has that conv and its BatchNorm re-initialised, so its
  "unchanged" entries measure what losing the layer costs (the reference does the same).

The changed network is finetuned from the original weights for `epochs` epochs (the run's
`train` optimizer and schedule), and the entry is its validation accuracy minus the
original's, in points (Δacc; the validation split is held out of the training data).
The keys are the reference's (`exclude_zeros`): (1, 1) for every segment; for a segment not
starting at 0, also (0, 1) when i is a block end, or else (1, 0) when j is one: 315 keys
for MobileNetV2's 171 segments, as the reference's, and 22 for ResNet-18's 22.

Normalisation (ECDC's `single`): I = Δacc − α · mean(Δacc over the one-conv entries).
The mean is negative, so each segment of a plan earns a bonus α·|mean|; that bonus is what
keeps the search from merging everything (α: 1.6 for MobileNetV2-1.0, 1.2 for 1.4).

Every activation change is a mask (the ReLU6s of the block ends are inserted once, off),
so every entry runs the one compiled train step. Finished entries are written to
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
from jaxprune.methods.layermerge.space import INSERTED_ACT, ModelSpace, conv_bn
from jaxprune.train import Trainer, fit
from models.layers import Act
from models.net import Net

SCHEMA = "jaxprune.layermerge.importance/1"
FILE = "importance.json"


def keys(ms: ModelSpace) -> list[tuple[int, int, int, int]]:
    """The measured keys (i, j, a_i, a_j) in (i, j) order (see the module doc)."""
    space, out = ms.space, []
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


class _Probe:
    """The original network with a ReLU6 inserted (off) at every free block end, and what
    one key changes in it: masks, and a fresh conv + BatchNorm for one-conv segments."""

    def __init__(self, original: Net, ms: ModelSpace, seed: int):
        import models
        self.ms, self.m = ms, nnx.clone(original)
        self.inserted = {}
        for p, (after, name) in ms.free_after.items():
            self.m.insert_after(after, name, Act(INSERTED_ACT))
            self.inserted[p] = name
        self.base = nnx.clone(self.m)  # a copy: a state of self.m would share its variables
        spec = original.spec
        self.fresh = models.create(spec.arch, num_classes=spec.num_classes, seed=seed + 1,
                                   **dict(spec.options))

    def _mask(self, name: str, on: bool) -> None:
        layer = self.m.layers[name]
        layer.mask.value = jnp.full_like(layer.mask.value, float(on))

    def set(self, key: tuple[int, int, int, int]) -> None:
        i, j, ai, aj = key
        nnx.update(self.m, nnx.state(self.base))
        inside = {p.site for p in self.ms.positions[i + 1:j] if p.site}
        for s in self.m.sites():
            self._mask(s, s not in inside)
        for p, name in self.inserted.items():
            self._mask(name, (p == i and ai == 1) or (p == j and aj == 1))
        if j == i + 1:
            conv = self.ms.positions[j].conv
            for name in filter(None, (conv, conv_bn(self.m, conv))):
                nnx.update(self.m.layers[name], nnx.state(self.fresh.layers[name]))


def _key_text(k) -> str:
    return ",".join(map(str, k))


def _load(path: Path, header: dict) -> dict[str, float]:
    """The entries of an earlier attempt of this run, when made with the same settings."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    differ = [f"{k} {data.get(k)!r} (here {v!r})" for k, v in header.items()
              if data.get(k) != v]
    if differ:
        raise UserError(f"{path} holds importance entries made with other settings "
                        f"({'; '.join(differ)}): use a new run name, or delete the file to "
                        "measure them again")
    return dict(data["delta"])


def finetune_importance(ctx: RunContext, original: Net, ms: ModelSpace, base_val_acc: float,
                        *, epochs: int, alpha: float) -> tuple[dict[tuple, float], dict]:
    """The importance table {(i, j, a_i, a_j): I} of `ms` (see the module doc) for
    `dp.extend_importance`, and a summary for results.json (the raw Δacc and the
    importance per key, the baseline, α and the one-conv mean). `base_val_acc`: the original's validation accuracy (%)."""
    path = ctx.run_dir / FILE
    header = json.loads(json.dumps(  # as the file holds it (tuples as lists)
        {"schema": SCHEMA, "space_hash": ms.hash, "epochs": epochs,
         "train": dataclasses.asdict(ctx.cfg.train), "base_val_acc": base_val_acc}))
    done = _load(path, header)
    todo = keys(ms)
    probe = _Probe(original, ms, ctx.cfg.seed)
    train = dataclasses.replace(ctx.cfg.train, epochs=epochs)
    trainer = Trainer(probe.m, train, steps_per_epoch=ctx.data.steps_per_epoch(), mesh=ctx.mesh)
    left = [k for k in todo if _key_text(k) not in done]
    if left:
        ctx.log(f"layermerge: finetuning {len(left)} of {len(todo)} importance entries "
                f"({epochs} epoch(s) each) ...")
    for n, k in enumerate(left):
        probe.set(k)
        trainer.start_round()
        fit(trainer, ctx.data, epochs, tag={"importance": f"{n + 1}/{len(left)}"},
            epoch_offset=ctx.cfg.method.pretrain_epochs)
        acc = trainer.evaluate(ctx.data.eval_batches("val"))["acc"]
        done[_key_text(k)] = float(acc - base_val_acc)
        if distributed.is_main():
            path.write_text(json.dumps({**header, "delta": done}, indent=1) + "\n")
    delta = {k: done[_key_text(k)] for k in todo}
    importance = normalize(delta, alpha)
    return importance, {"entries": len(todo), "epochs": epochs, "alpha": alpha,
                        "base_val_acc": base_val_acc, "single_mean": single_mean(delta),
                        "delta": {_key_text(k): v for k, v in delta.items()},
                        "importance": {_key_text(k): v for k, v in importance.items()},
                        "file": str(path)}
