"""`method: snl` — Selective Network Linearization (Cho et al., ICML 2022), DepthShrinker's baseline.

Every activation site of the model gets trainable α, per channel `(C,)` or per
pixel `(H, W, C)` at the training image size, initialised at 1 and unclamped:
`y = α ⊙ act(x) + (1 − α) ⊙ x` (the site's mask). The search trains weights
and α with Adam (`search_lr`) on

    CE + T² KL(teacher ‖ student) at T = `temperature` + λ Σ ‖α‖₁

with the original network as the teacher. λ starts at `lam` and grows by
`lam_growth` after every epoch (from epoch `lam_from_epoch`) that did not lower
the ReLU count `Σ [α > threshold]` (each α counted for the activations it
covers). The search stops once the count is within the budget (`relu_budget`
ReLUs per image, or `relu_fraction` of the model's), or after `search_epochs`.
Then the masks are binarized (α > threshold; if the budget was not reached,
the largest α within it), frozen, and the weights finetuned with the `train:`
section and the same distillation.

Channel and pixel masks cut the ReLU count (what private inference pays for)
but make no layer linear as a whole, so nothing is fused.

The package: `masks.py` (α's shapes, ReLU counts, binarization), `method.py`
(the search and the finetune), `report.py`.
"""
from __future__ import annotations

import dataclasses

from jaxprune.config import MethodConfig
from jaxprune.methods import register

GRANULARITIES = ("channel", "pixel")


@register("snl", run="jaxprune.methods.snl.method")
@dataclasses.dataclass(frozen=True)
class SNLConfig(MethodConfig):
    name: str = "snl"
    granularity: str = "channel"        # channel: α of shape (C,); pixel: (H, W, C)
    relu_budget: int | None = None      # ReLUs per image to keep ...
    relu_fraction: float | None = 0.5   # ... or the fraction of the model's ReLUs to keep
    lam: float = 1e-5                   # initial weight of Σ ‖α‖₁
    lam_growth: float = 1.1             # λ factor after an epoch that did not lower the count
    lam_from_epoch: int = 5             # the first epoch (1-based) λ may grow after
    threshold: float = 1e-2             # an α above it keeps its ReLU
    search_epochs: int = 100            # the most search epochs; it stops at the budget
    search_lr: float = 1e-3             # Adam, on the weights and α
    alpha_lr_scale: float = 1.0         # α's step size relative to the weights' (1: the paper)
    temperature: float = 4.0            # distillation temperature (search and finetune)
    pretrain_epochs: int = 0            # dense training first (models without pretrained weights)
