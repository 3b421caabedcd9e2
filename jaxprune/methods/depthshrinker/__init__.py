"""`method: depthshrinker` — learned removal of whole blocks' activations (Fu et al., ICML 2022).

Two stages on an inverted-residual network (a model that declares its blocks:
`mobilenet_v2` in torchvision or timm layout, any width, `mobilenet_v2_cifar`,
`efficientnet_lite0`) with one gate per candidate (`groups.py`: the stem, the
depthwise-separable block, one shared gate per inverted residual, the head;
N = 19 on MobileNetV2):

1. **search**: gate scores trained with the weights; before every step the
   `k = floor(N * ratio)` smallest scores keep their activations (hard top-k,
   straight-through gates with torch's clamp gradient, `gates.py`), plus the
   cost regularizer `cost_weight * Σ Δ (1 - s)` ("reduce", default) or the
   released `Σ Δ s` ("keep"), with Δ from a cost table (`cost.py`); optional
   Gumbel exploration. Writes the keep-lists for the kept fractions 0.8 ... 0.1
   to `keep_lists.json`.
2. **finetune**: from the *original* weights, with the keep-list from the
   search scores (`ratio`), from an earlier search run (`search_run`) or given
   (`act_list`, one value per gate, 1 = keep). Every removed inverted residual
   gets a ReLU6 after its output (after the residual add: `final_act`).
   Optional self-distillation from the original network (`distill`, α, T) and
   progressive removal (the removed gates go a few at a time until
   `progressive_epochs`). Then `jaxprune.merge` fuses each removed block into
   one dense conv, the result is profiled against the dense network and
   exported to PyTorch.

    method:
      name: depthshrinker
      stage: both              # search | finetune | both
      ratio: 0.4               # kept fraction of the gates
      cost: given              # given (lat_before/lat_after) | measured | relu
      cost_sign: reduce        # reduce | keep (as released)

Both stages train `train.epochs` epochs with the `train:` section (the paper:
SGD Nesterov, cosine to min_lr, wd 1e-5 without 1-D parameters, clip 5,
label smoothing 0.1). Each stage is checkpointed; rerunning the config resumes.
"""
from __future__ import annotations

import dataclasses

from jaxprune.config import Config, FuseConfig, option
from jaxprune.errors import UserError
from jaxprune.methods import register

STAGES = ("search", "finetune", "both")
COST_KINDS = ("given", "measured", "relu")
COST_SIGNS = ("reduce", "keep")
PROGRESSIVE_MODES = ("forward", "backward")
KEEP_LISTS = "keep_lists.json"  # what a search writes into its run folder
# The seed config's tables for MobileNetV2-1.4 (ms per gate, V100).
LAT_BEFORE = (0, 56.97, 138.79, 82.45, 47.03, 34.51, 34.51, 21.19, 17.91, 17.91, 17.91, 20.75,
              31.27, 31.27, 16.67, 14.21, 14.21, 18.77, 0)
LAT_AFTER = (0, 41.78, 5.45, 6.68, 3.23, 4.12, 4.12, 2.38, 2.72, 2.72, 2.72, 3.75, 5.04, 5.04,
             3.44, 2.8, 2.8, 4.38, 0)


@register("depthshrinker", run="jaxprune.methods.depthshrinker.method")
@dataclasses.dataclass(frozen=True)
class DepthShrinkerConfig(FuseConfig):
    name: str = "depthshrinker"
    stage: str = option("both", choices=STAGES)
    # kept fraction of the gates (the released L0_SPARSITY)
    ratio: float = option(0.4, ge=0, le=1)
    # finetune from this keep-list (one 0/1 per gate)
    act_list: list[int] | None = option(None, choices=(0, 1), why="1 keeps a gate, 0 removes it")
    search_run: str | None = None      # run folder of an earlier search to take the keep-list from
    # dense training first (models without pretrained weights)
    pretrain_epochs: int = option(0, ge=0)
    cost: str = option("given", choices=COST_KINDS)
    lat_before: list[float] = option(default_factory=lambda: list(LAT_BEFORE), ge=0)
    lat_after: list[float] = option(default_factory=lambda: list(LAT_AFTER), ge=0)
    cost_weight: float = option(1e-4, ge=0)  # λ of the cost regularizer
    # reduce: λ Σ Δ (1 - s); keep: λ Σ Δ s (as released)
    cost_sign: str = option("reduce", choices=COST_SIGNS)
    cost_batch: int = option(1, ge=1)      # batch size the measured table is timed at
    gumbel_epochs: int = option(0, ge=0)   # search epochs that rank s + scale * Gumbel noise
    gumbel_scale: float = option(1.0, ge=0)  # noise scale in the first epoch
    gumbel_decay: float = option(0.95, ge=0, le=1)  # noise scale factor per epoch
    final_act: bool = True             # a ReLU6 after every removed inverted residual
    distill: bool = False              # finetune with self-distillation from the original
    # α · T² KL(teacher ‖ student) + (1 − α) · CE
    distill_alpha: float = option(0.7, ge=0, le=1)
    distill_temperature: float = option(1.0, gt=0)
    progressive: bool = False          # remove the gates a few at a time during the finetune
    # all removed by this epoch; null: 2/3 of train.epochs
    progressive_epochs: int | None = option(None, ge=0)
    # forward: the first blocks go first; backward: the last
    progressive_mode: str = option("forward", choices=PROGRESSIVE_MODES)

    def progressive_until(self, cfg: Config) -> int:
        """The epoch by which progressive removal has removed every gate it removes."""
        if self.progressive_epochs is not None:
            return self.progressive_epochs
        return (2 * cfg.train.epochs) // 3  # the released 120 of 180 epochs

    def check(self, cfg: Config) -> None:
        if self.stage == "both" and self.act_list is not None:
            raise UserError("method.stage 'both' takes its keep-list from its own search; drop "
                            "method.act_list, or set method.stage: finetune to finetune from it")
        if self.stage == "finetune" and self.act_list is None and self.search_run is None:
            raise UserError("method.stage 'finetune' needs a keep-list: set method.act_list "
                            "(one 0/1 per gate) or method.search_run (the run folder of a search)")
        if self.progressive and self.progressive_until(cfg) >= cfg.train.epochs:
            raise UserError(f"method.progressive_epochs ({self.progressive_until(cfg)}) must be "
                            f"less than train.epochs ({cfg.train.epochs}): the last epoch trains "
                            f"the final pattern")
        if self.cost == "given" and len(self.lat_before) != len(self.lat_after):
            raise UserError(f"method.lat_before has {len(self.lat_before)} values, "
                            f"method.lat_after {len(self.lat_after)}: give one pair per gate")

    def inputs(self) -> dict[str, str]:
        if self.stage == "finetune" and self.act_list is None:
            return {"method.search_run": f"{self.search_run.rstrip('/')}/{KEEP_LISTS}"}
        return {}

    def check_model(self, cfg: Config, m) -> None:
        import models
        if models.entry(cfg.model.name).blocks is None:
            with_blocks = [n for n in models.available() if models.entry(n).blocks is not None]
            raise UserError(f"depthshrinker gates the blocks of inverted-residual networks: "
                            f"model.name must be one of {with_blocks}, got {cfg.model.name!r}")
        from jaxprune.methods.depthshrinker.groups import groups
        n = len(groups(m))
        sized = {"method.act_list": self.act_list}
        if self.cost == "given":
            sized.update({"method.lat_before": self.lat_before, "method.lat_after": self.lat_after})
        for key, values in sized.items():
            if values is not None and len(values) != n:
                raise UserError(f"{key} has {len(values)} values, {cfg.model.name} has {n} gates: "
                                f"give one per gate" + (" (or set method.cost to measured or "
                                                         "relu)" if key != "method.act_list" else ""))
