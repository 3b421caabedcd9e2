"""Per-round checkpoints: the model state as safetensors plus a JSON record.

    ckpt = Checkpoints(run_dir / "checkpoints")
    ckpt.save(3, m, {"rounds": [...]})    # checkpoints/round_003/{state.safetensors,meta.json}
    ckpt.latest()                         # 3, or None
    meta = ckpt.load(3, m)                # weights, statistics and masks back into m

A checkpoint is written into a temporary folder beside its final place and
renamed into it, so a crash never leaves a half-written `round_NNN/`. Stored:
parameters, BatchNorm statistics and site masks, keyed by their NNX path
(`layers/layer1.0.conv1/kernel`); random-number state is not (it is re-seeded).
Only process 0 writes; every process can read.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxprune import distributed
from jaxprune.errors import UserError
from models.layers import Mask
from models.net import Net

STATE_FILE, META_FILE = "state.safetensors", "meta.json"
SAVED = (nnx.Param, nnx.BatchStat, Mask)


def _flat(state) -> dict[str, nnx.Variable]:
    return {"/".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}


class Checkpoints:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, round_: int) -> Path:
        return self.folder / f"round_{round_:03d}"

    def rounds(self) -> list[int]:
        """Rounds with a complete checkpoint, ascending."""
        if not self.folder.is_dir():
            return []
        return sorted(int(p.name[6:]) for p in self.folder.glob("round_[0-9][0-9][0-9]")
                      if (p / META_FILE).is_file() and (p / STATE_FILE).is_file())

    def latest(self) -> int | None:
        done = self.rounds()
        return done[-1] if done else None

    def save(self, round_: int, m: Net, meta: dict) -> Path:
        final = self.path(round_)
        if distributed.is_main():
            self._write(final, m, meta)
        distributed.barrier(f"checkpoint {final}")  # no process reads it before it is complete
        return final

    def _write(self, final: Path, m: Net, meta: dict) -> None:
        tensors = {k: np.array(v.get_value())  # a copy; keeps 0-d masks 0-d
                   for k, v in _flat(nnx.state(m, SAVED)).items()}
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / STATE_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def load(self, round_: int, m: Net) -> dict:
        """Load round `round_` into `m` (in place); returns its meta record."""
        where = self.path(round_)
        if not (where / STATE_FILE).is_file():
            raise UserError(f"no checkpoint of round {round_} in {self.folder}")
        tensors = load_file(str(where / STATE_FILE))
        state = nnx.state(m, SAVED)
        own = _flat(state)
        if set(tensors) != set(own):
            missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise UserError(f"{where} does not fit this model (missing {missing[:3]}, unexpected "
                            f"{extra[:3]}); it belongs to another model: use another run name")
        for key, var in own.items():
            value = tensors[key]
            if value.shape != var.get_value().shape:
                raise UserError(f"{where}: '{key}' has shape {value.shape}, the model expects "
                                f"{var.get_value().shape}; it belongs to another model")
            var.set_value(jax.numpy.asarray(value))
        nnx.update(m, state)
        return json.loads((where / META_FILE).read_text())
