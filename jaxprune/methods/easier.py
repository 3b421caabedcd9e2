"""`method: easier` — entropy-based depth reduction (Quétu et al., ECML PKDD 2024).

Round 0 trains the dense model. Every following round linearizes the
activation site(s) whose ON/OFF entropy in the previous round's last
training epoch was lowest (DESIGN.md §5) and retrains the full schedule with
a fresh optimizer. Linearizing changes a mask, i.e. state: every round runs
the one compiled train step.

    method:
      name: easier
      max_rounds: null     # linearization rounds after round 0; null: until a stop below
      acc_budget: 1.0      # largest allowed drop of validation accuracy vs round 0 (points)
      merge_cost: macs     # how jaxprune.merge decides which linear runs to fuse

Stops after `max_rounds`, after the first round whose validation accuracy
drops more than `acc_budget` points below round 0, or when every site is
linear. The selected model is the round with the most sites linearized inside
the budget; it is fused (`jaxprune.merge`), exported to PyTorch and reported
(`results.json`, `report.md`, plots). Every epoch and every round is checkpointed;
running the same config again continues from the last checkpoint. A round whose loss
turns NaN or infinite ends the search: the rounds before it are selected from as
usual, and the results record where it diverged.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax

from jaxprune import report
from jaxprune.activation_sites import linearize, linearized
from jaxprune.config import Config, MethodConfig
from jaxprune.errors import UserError
from jaxprune.methods import register
from jaxprune.methods.staged import fuse_and_export, image_size
from jaxprune.train import Data, Diverged, Journal, Trainer, fit, make_mesh
from jaxprune.train.checkpoint import Checkpoints


@dataclasses.dataclass(frozen=True)
class EasierConfig(MethodConfig):
    name: str = "easier"
    max_rounds: int | None = None  # linearization rounds after the dense round 0; None: no limit
    acc_budget: float = 1.0        # points of validation accuracy that may be lost vs round 0
    merge_cost: str = "macs"       # jaxprune.merge's cost model: macs | latency | none (fuse all)


def select_sites(entropy: dict[str, float], done) -> list[str]:
    """The reference rule: among the sites not yet linear, set the lowest entropy to 0
    (the first in forward order on a tie) and pick every site whose entropy is 0."""
    done = set(done)
    remaining = [n for n in entropy if n not in done]
    if not remaining:
        return []
    lowest = min(remaining, key=lambda n: entropy[n])
    return [n for n in remaining if n == lowest or entropy[n] == 0.0]


def stop_reason(rounds: list[dict], opts: EasierConfig) -> str | None:
    """Why no further round should run after `rounds`, or None to continue."""
    last = rounds[-1]
    if rounds[0]["val_acc"] - last["val_acc"] > opts.acc_budget:
        return (f"round {last['round']} lost {rounds[0]['val_acc'] - last['val_acc']:.2f} points "
                f"of validation accuracy (budget {opts.acc_budget})")
    if last["n_linear"] >= last["n_sites"]:
        return "every site is linear"
    if opts.max_rounds is not None and last["round"] >= opts.max_rounds:
        return f"method.max_rounds = {opts.max_rounds} reached"
    return None


def select_round(rounds: list[dict], budget: float) -> dict:
    """The round with the most sites linearized whose validation accuracy is within
    `budget` points of round 0 (round 0 itself always is)."""
    base = rounds[0]["val_acc"]
    inside = [r for r in rounds if base - r["val_acc"] <= budget]
    return max(inside, key=lambda r: (r["n_linear"], r["round"]))


def _check(opts: EasierConfig) -> None:
    from jaxprune.merging import COST_MODELS
    if opts.merge_cost not in COST_MODELS:
        raise UserError(f"method.merge_cost must be one of {list(COST_MODELS)}, "
                        f"got {opts.merge_cost!r}")
    if opts.max_rounds is not None and opts.max_rounds < 0:
        raise UserError(f"method.max_rounds must be >= 0 or null, got {opts.max_rounds}")
    if opts.acc_budget < 0:
        raise UserError(f"method.acc_budget is a drop in points and must be >= 0, "
                        f"got {opts.acc_budget}")


@register("easier", config=EasierConfig)
def run(cfg: Config, run_dir) -> dict:
    from jaxprune.runner import build_model
    opts: EasierConfig = cfg.method
    _check(opts)
    run_dir = Path(run_dir)
    started = time.perf_counter()
    mesh = make_mesh()
    data = Data(cfg, mesh)
    m = build_model(cfg, data.info.num_classes)
    names = m.sites()
    ckpt = Checkpoints(run_dir / "checkpoints" / "rounds")
    rounds: list[dict] = []
    if ckpt.latest() is not None:  # resume after the last finished round
        rounds = ckpt.load(ckpt.latest(), m)["rounds"]
        if jax.process_index() == 0:
            print(f"resuming after round {rounds[-1]['round']} from {ckpt.path(ckpt.latest())}",
                  flush=True)
    trainer = Trainer(m, cfg.train, steps_per_epoch=data.steps_per_epoch(), mesh=mesh)
    journal = Journal(run_dir)
    diverged = None

    while not rounds or stop_reason(rounds, opts) is None:
        r = len(rounds)
        new = select_sites(rounds[-1]["entropy"], linearized(m)) if rounds else []
        linearize(m, new)
        t0 = time.perf_counter()
        trainer.start_round()
        try:
            last = fit(trainer, data, cfg.train.epochs, journal=journal, tag={"round": r},
                       epoch_offset=r * cfg.train.epochs)[-1]
        except Diverged as e:
            if not rounds:
                raise  # no round to select from
            diverged = {**e.record, "message": str(e)}
            print(f"round {r}: {e}", flush=True)
            break
        test = trainer.evaluate(data.eval_batches("test"))
        done = linearized(m)
        rounds.append({"round": r, "new": new, "linearized": done, "n_linear": len(done),
                       "n_sites": len(names), "train_loss": last["train_loss"],
                       "train_acc": last["train_acc"], "val_loss": last["val_loss"],
                       "val_acc": last["val_acc"], "test_loss": test["loss"],
                       "test_acc": test["acc"], "entropy": last["entropy"],
                       "seconds": time.perf_counter() - t0})
        ckpt.save(r, m, {"rounds": rounds})
        if jax.process_index() == 0:
            print(f"round {r}: {len(done)}/{len(names)} sites linear, val {last['val_acc']:.2f} %, "
                  f"test {test['acc']:.2f} %" + (f", linearized {', '.join(new)}" if new else ""),
                  flush=True)

    stop = (f"round {len(rounds)} diverged (non-finite loss in epoch {diverged['epoch']}, "
            f"step {diverged['step']})" if diverged else stop_reason(rounds, opts))
    chosen = select_round(rounds, opts.acc_budget)
    ckpt.load(chosen["round"], m)
    results = {
        "method": "easier", "model": cfg.model.name, "dataset": cfg.data.name, "sites": names,
        "rounds": rounds,
        "selected": {"round": chosen["round"], "linearized": chosen["linearized"],
                     "n_linear": chosen["n_linear"], "n_sites": chosen["n_sites"],
                     "val_acc": chosen["val_acc"], "test_acc": chosen["test_acc"],
                     "val_drop": rounds[0]["val_acc"] - chosen["val_acc"],
                     "acc_budget": opts.acc_budget, "stop": stop,
                     "checkpoint": str(ckpt.path(chosen["round"]))},
    }
    if diverged:
        results["diverged"] = diverged
    # The masked model is its own "before": identities do not change its depth until fused.
    merged, _ = fuse_and_export(m, m, run_dir, image_size(cfg, data), cost=opts.merge_cost)
    results.update(merged)
    results["seconds"] = time.perf_counter() - started
    report.write(run_dir, results)
    return results
