"""`method: parity` — does jaxprune compute what the torch checkpoint computes?

Imports a torch model into jaxprune (`converters.from_torch`), runs both in
eval mode on the same random inputs at each size, prints the largest logit
difference against the documented tolerance (DESIGN.md §4) and records it in
results.json. Fails (exit status 2) when any size is outside the tolerance.
The comparison itself is `converters.check`.

    method:
      name: parity
      source: random                  # or weights.pth / .safetensors / torchvision:IMAGENET1K_V1
                                      # or an export folder (checked against its model.pt2)
      sizes: [32, 33]                 # empty: the model's native input size

`source: random` checks the converter on a randomly initialised torch original
of `model.name` with `model.options` (BatchNorm statistics randomised so that
they matter); a path or `torchvision:<WEIGHTS>` checks those weights. A
`converters.export` folder (e.g. a run's `export/`, pruned and fused) is checked
against its own `model.pt2`, loaded by torch alone.
"""
from __future__ import annotations

import dataclasses

from jaxprune.config import MethodConfig
from jaxprune.methods import register


@register("parity", run="jaxprune.methods.parity.method")
@dataclasses.dataclass(frozen=True)
class ParityConfig(MethodConfig):
    name: str = "parity"
    # random | a .pth/.pt/.safetensors file or export folder | torchvision:<WEIGHTS>
    source: str = "random"
    sizes: list[int] = dataclasses.field(default_factory=list)  # square input sizes; empty: native
    batch: int = 2
