"""`method: layermerge` — latency-aware depth compression: ECDC (Kim et al., ICML 2023,
"Efficient latency-aware CNN depth compression via two-stage dynamic programming") and
LayerMerge (Kim et al., ICML 2024, "LayerMerge: neural network depth compression through
layer pruning and merging").

Both choose which consecutive convolutions to merge into one (and, in LayerMerge, which
to drop) so that the summed measured latency of the merged pieces fits a budget while
the summed importance of the pieces is largest. The method runs ECDC's space
(`drop_layers: false`) or LayerMerge's (`drop_layers: true`: convs that keep their input's
shape inside the searched blocks may also become the identity, each segment has one option
per kernel it may merge into, and there is no T_opt stage):

1. the original network (`pretrain_epochs` of dense training when it has no weights);
2. its search space (`space.py`) and the latency table T(i, j) of every segment, timed
   here in JAX or, with `runtime: torch`, as its torch export run eagerly, less the
   runtime's per-call overhead (`latency.py`; cached in the run folder, or reused:
   `latency_table`), and ECDC's stage 1, T_opt; `runtime: [torch, jax]` times a table
   in each;
3. the importance of each segment: the papers' `finetune` (`finetune_importance.py`: per
   segment, or per option with layer dropping, the validation accuracy after a short
   finetune with that segment merged, normalised as ECDC or LayerMerge), or a cheap
   proxy (`importance.py`: `entropy`, EASIER's ON/OFF entropy over one epoch of training
   data, or `bn_entropy`, data-free from the BatchNorm before the site: a segment earns
   the entropy of the activation it keeps at its end, so the search keeps the
   high-entropy activations the budget allows; with layer dropping, minus `drop_penalty`
   times the dropped convs' worth on the same scale);
4. the exact dynamic program (`dp.py`) under the budget (`target_speedup` or `latency_ms`
   of the whole model as the table predicts it: `latency.LatencyTable`; with several
   runtimes, `target_speedup` in each at once), written to `plan.json` (`plan: PATH`
   replays one); with `plan_checks: N`, the plan's whole model is timed before
   finetuning and, where it measures short of the goal, searched again under a tighter
   budget, up to N plans (`check.py`);
5. the plan applied (sites inside segments linearized, dropped convs removed), finetuned
   for `finetune_epochs` (optionally distilled from the original), then merged exactly as planned
   (`jaxprune.merge(cost="none", cuts=...)`), exported and timed.

    method:
      name: layermerge
      target_speedup: 1.5      # or latency_ms
      importance: entropy      # entropy | bn_entropy | finetune
      importance_epochs: 1     # finetune: epochs per table entry
      importance_images: null  # finetune: images per epoch (null: the training set)
      importance_lr: null      # finetune: its learning rate (null: train.lr)
      importance_alpha: 1.6    # finetune, ECDC's space: the per-segment bonus
      finetune_epochs: null    # null: train.epochs

The package: `dp.py` (the search as pure functions over tables, the plan file), `space.py`
(the ECDC and LayerMerge spaces of ResNet-18 and MobileNetV2, and what a plan changes),
`latency.py` (T(i, j) measured), `importance.py` (the proxies), `finetune_importance.py`
(the papers' importance table), `check.py` (the plan checks), `method.py` (the stages),
`report.py`.
"""
from __future__ import annotations

import dataclasses

from jaxprune.config import Config, MethodConfig, option
from jaxprune.errors import UserError, counted
from jaxprune.measure import RUNTIMES
from jaxprune.methods import register

IMPORTANCES = ("entropy", "bn_entropy", "finetune")
TIMINGS = ("alone", "in_model")  # a segment timed as its layer alone, or in the whole model
# what a run writes in its folder
PLAN_FILE, TABLE_FILE, PLAN_CHECKS_FILE = "plan.json", "latency_table.json", "plan_checks.json"


def table_file(runtime: str, runtimes: tuple[str, ...]) -> str:
    """The run folder's file of `runtime`'s latency table: `latency_table.json`, or with
    several runtimes `latency_table.<runtime>.json`."""
    return TABLE_FILE if len(runtimes) == 1 else f"latency_table.{runtime}.json"


@register("layermerge", run="jaxprune.methods.layermerge.method")
@dataclasses.dataclass(frozen=True)
class LayerMergeConfig(MethodConfig):
    name: str = "layermerge"
    # true: LayerMerge's space (convs may also be dropped)
    drop_layers: bool = False
    # true (beyond the papers): a ResNet downsampling block may merge as a whole, its
    # strided conv and 1x1 shortcut composed exactly (with drop_layers: one strided conv)
    strided_blocks: bool = False
    # λ: what dropping a conv of average L1 norm costs, in units of the mean site entropy
    drop_penalty: float = option(1.0, ge=0)
    # the whole model's latency budget = its time / target_speedup, or ...
    target_speedup: float | None = option(None, gt=1, why="the planned model's speed-up "
                                          "over the dense one, as the latency table "
                                          "predicts the whole model")
    # ... the budget itself, the whole model's ms per batch of latency_batch (one of two)
    latency_ms: float | None = option(None, gt=0)
    importance: str = option("entropy", choices=IMPORTANCES)
    # importance: finetune — epochs of each entry's finetune, and ECDC's α (the bonus per
    # segment, in units of the mean one-conv Δacc: 1.6 for MobileNetV2-1.0, 1.2 for 1.4;
    # LayerMerge's space normalises with exp(Δacc / 100) instead)
    importance_epochs: int = option(1, ge=1)
    # ... and the images each of its epochs trains on: the first this many of the epoch's
    # shuffled order (LayerMerge: a 50k subset of ImageNet-train); null: every image
    importance_images: int | None = option(None, ge=1)
    # ... and its learning rate (null: train.lr; LayerMerge: 0.1 at batch 256)
    importance_lr: float | None = option(None, gt=0)
    importance_alpha: float = option(1.6, ge=0)
    # a latency table of an earlier run, reused (a list with several runtimes: one each)
    latency_table: str | list[str] | None = None
    plan: str | None = None            # a plan.json of an earlier run, replayed (no search)
    latency_batch: int = option(1, ge=1)     # batch the table and the final models are timed at
    # where the table is timed: jax (jit, the run's device) or torch (the export, eager,
    # CPU), or a list of both: a table in each, and the plan meets target_speedup in each
    runtime: str | list[str] = option("jax", choices=RUNTIMES, why="the runtime each "
                                      "segment's merged layer is timed in")
    # alone: each segment timed as its layer alone; in_model: each option of a longer
    # segment as the whole model with only it merged (what it saves there; a model each)
    latency_timing: str = option("alone", choices=TIMINGS, why="how a segment is timed: "
                                 "its layer alone, or the whole model with it merged")
    latency_rounds: int = option(3, ge=1)    # rounds, each one fresh process timing every segment
    # (beyond the papers) time up to this many plans' whole models before finetuning, each
    # after the first searched again under budgets tightened by what the last one measured
    # short of the goal (check.py; about a minute each at the digits size); 0: no check
    plan_checks: int = option(0, ge=0)
    latency_repeats: int = option(20, ge=1)  # timed calls per round
    # time bins over each runtime's budget (the DP's grid)
    bins: int | None = option(None, ge=1, why="null: 1000, or 400 each with several runtimes")
    # dense training first (models without pretrained weights)
    pretrain_epochs: int = option(0, ge=0)
    finetune_epochs: int | None = option(None, ge=0, why="null: train.epochs")
    # weight α of α · T² KL(original ‖ planned) + (1 − α) · CE; 0: no distillation
    distill: float = option(0.0, ge=0, le=1)
    distill_temperature: float = option(1.0, gt=0)
    latency: bool = True    # time the dense and the fused model (jaxprune.measure; ~1 min)

    @property
    def runtimes(self) -> tuple[str, ...]:
        """The runtimes the tables are timed in, the first one's table the plan's primary."""
        return (self.runtime,) if isinstance(self.runtime, str) else tuple(self.runtime)

    @property
    def latency_tables(self) -> tuple[str | None, ...]:
        """The given table of each runtime of `runtimes` (None: measure it)."""
        given = self.latency_table
        if given is None:
            return (None,) * len(self.runtimes)
        return (given,) if isinstance(given, str) else tuple(given)

    def check(self, cfg: Config) -> None:
        rts = self.runtimes
        if not rts or len(set(rts)) != len(rts):
            raise UserError(f"method.runtime is {list(rts)}: name jax, torch, or both once "
                            "each")
        if len(rts) > 1 and self.latency_ms is not None:
            raise UserError(f"method.latency_ms is one runtime's time, and method.runtime "
                            f"names {len(rts)}: set method.target_speedup instead, which "
                            "holds in each")
        if len(self.latency_tables) != len(rts):
            raise UserError(f"method.latency_table gives "
                            f"{counted(len(self.latency_tables), 'table')} "
                            f"for the {len(rts)} runtimes of method.runtime ({', '.join(rts)})"
                            ": give one table per runtime, in that order")
        if self.plan is None and (self.target_speedup is None) == (self.latency_ms is None):
            raise UserError("set exactly one of method.target_speedup and method.latency_ms "
                            "(or method.plan to replay a plan)")
        if self.plan is not None and (self.target_speedup, self.latency_ms) != (None, None):
            raise UserError("method.plan replays a plan with its own budget: drop "
                            "method.target_speedup and method.latency_ms")
        if self.plan is not None and self.plan_checks:
            raise UserError("method.plan_checks searches again when a plan misses its goal, "
                            "and method.plan replays a plan without a search: drop one of "
                            "them")
        for key in ("importance_images", "importance_lr"):
            if getattr(self, key) is not None and self.importance != "finetune":
                raise UserError(f"method.{key} sets the finetunes of importance: finetune, "
                                f"and this run's importance is {self.importance}: drop "
                                f"method.{key} or set method.importance: finetune")
        if (self.importance_lr is not None and cfg.train.schedule == "cosine"
                and self.importance_lr < cfg.train.min_lr):
            raise UserError(f"method.importance_lr ({self.importance_lr:g}) must be at least "
                            f"train.min_lr ({cfg.train.min_lr:g}): each finetune's cosine "
                            "schedule decays from it to min_lr")

    def inputs(self) -> dict[str, str]:
        tables = self.latency_tables
        named = [(f"latency_table[{k}]" if isinstance(self.latency_table, list)
                  else "latency_table", path) for k, path in enumerate(tables)]
        return {f"method.{k}": v for k, v in (*named, ("plan", self.plan)) if v is not None}

    def check_model(self, cfg: Config, m) -> None:
        from jaxprune.methods.layermerge.space import build_space
        build_space(m, strided_blocks=self.strided_blocks)  # refuses a model it has no rules for
