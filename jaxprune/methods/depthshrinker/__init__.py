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

from jaxprune.config import FuseConfig
from jaxprune.methods import register

STAGES = ("search", "finetune", "both")
COST_KINDS = ("given", "measured", "relu")
COST_SIGNS = ("reduce", "keep")
PROGRESSIVE_MODES = ("forward", "backward")
# The seed config's tables for MobileNetV2-1.4 (ms per gate, V100).
LAT_BEFORE = (0, 56.97, 138.79, 82.45, 47.03, 34.51, 34.51, 21.19, 17.91, 17.91, 17.91, 20.75,
              31.27, 31.27, 16.67, 14.21, 14.21, 18.77, 0)
LAT_AFTER = (0, 41.78, 5.45, 6.68, 3.23, 4.12, 4.12, 2.38, 2.72, 2.72, 2.72, 3.75, 5.04, 5.04,
             3.44, 2.8, 2.8, 4.38, 0)


@register("depthshrinker", run="jaxprune.methods.depthshrinker.method")
@dataclasses.dataclass(frozen=True)
class DepthShrinkerConfig(FuseConfig):
    name: str = "depthshrinker"
    stage: str = "both"                # search | finetune | both
    ratio: float = 0.4                 # kept fraction of the gates (the released L0_SPARSITY)
    act_list: list[int] | None = None  # finetune from this keep-list (one 0/1 per gate)
    search_run: str | None = None      # run folder of an earlier search to take the keep-list from
    pretrain_epochs: int = 0           # dense training first (models without pretrained weights)
    cost: str = "given"                # given | measured | relu
    lat_before: list[float] = dataclasses.field(default_factory=lambda: list(LAT_BEFORE))
    lat_after: list[float] = dataclasses.field(default_factory=lambda: list(LAT_AFTER))
    cost_weight: float = 1e-4          # λ of the cost regularizer
    cost_sign: str = "reduce"          # reduce: λ Σ Δ (1 - s); keep: λ Σ Δ s (as released)
    cost_batch: int = 1                # batch size the measured table is timed at
    gumbel_epochs: int = 0             # search epochs that rank s + scale * Gumbel noise
    gumbel_scale: float = 1.0          # noise scale in the first epoch
    gumbel_decay: float = 0.95         # noise scale factor per epoch
    final_act: bool = True             # a ReLU6 after every removed inverted residual
    distill: bool = False              # finetune with self-distillation from the original
    distill_alpha: float = 0.7         # α · T² KL(teacher ‖ student) + (1 − α) · CE
    distill_temperature: float = 1.0
    progressive: bool = False          # remove the gates a few at a time during the finetune
    progressive_epochs: int | None = None  # all removed by this epoch; null: 2/3 of train.epochs
    progressive_mode: str = "forward"  # forward: the first blocks go first; backward: the last
