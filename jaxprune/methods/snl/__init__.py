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

from jaxprune.config import Config, MethodConfig, option
from jaxprune.errors import UserError
from jaxprune.methods import register

GRANULARITIES = ("channel", "pixel")


@register("snl", run="jaxprune.methods.snl.method")
@dataclasses.dataclass(frozen=True)
class SNLConfig(MethodConfig):
    name: str = "snl"
    # channel: α of shape (C,); pixel: (H, W, C)
    granularity: str = option("channel", choices=GRANULARITIES)
    relu_budget: int | None = option(None, ge=0)         # ReLUs per image to keep ...
    relu_fraction: float | None = option(0.5, gt=0, le=1)  # ... or the fraction of the model's
    lam: float = option(1e-5, gt=0)         # initial weight of Σ ‖α‖₁ (it grows by a factor)
    # λ factor after an epoch that did not lower the count
    lam_growth: float = option(1.1, ge=1)
    lam_from_epoch: int = option(5, ge=1)   # the first epoch (1-based) λ may grow after
    threshold: float = option(1e-2, ge=0)   # an α above it keeps its ReLU
    search_epochs: int = option(100, ge=1)  # the most search epochs; it stops at the budget
    search_lr: float = option(1e-3, gt=0)   # Adam, on the weights and α
    # α's step size relative to the weights' (1: the paper)
    alpha_lr_scale: float = option(1.0, gt=0)
    temperature: float = option(4.0, gt=0)  # distillation temperature (search and finetune)
    # dense training first (models without pretrained weights)
    pretrain_epochs: int = option(0, ge=0)

    def check(self, cfg: Config) -> None:
        if (self.relu_budget is None) == (self.relu_fraction is None):
            raise UserError("set exactly one of method.relu_budget (ReLUs per image) and "
                            "method.relu_fraction (fraction of the model's ReLUs); set the "
                            "other to null")
