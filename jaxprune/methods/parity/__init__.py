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
import typing

from jaxprune.config import Config, MethodConfig, is_file_reference, option
from jaxprune.errors import UserError
from jaxprune.methods import register


@register("parity", run="jaxprune.methods.parity.method")
@dataclasses.dataclass(frozen=True)
class ParityConfig(MethodConfig):
    name: str = "parity"
    # random | a .pth/.pt/.safetensors file or export folder | torchvision:<WEIGHTS>
    source: str = "random"
    # square input sizes; empty: the model's native size
    sizes: list[int] = option(default_factory=list, ge=8)
    batch: int = option(2, ge=1)
    reads_data: typing.ClassVar[bool] = False

    def check(self, cfg: Config) -> None:
        if cfg.model.pretrained:
            raise UserError("method parity checks the weights named by method.source; "
                            "model.pretrained is not used: move it to method.source")

    def input_sizes(self, cfg: Config, native: tuple[int, int]) -> list:
        return [(s, s) for s in self.sizes] or [native]

    def inputs(self) -> dict[str, str]:
        if self.source != "random" and is_file_reference(self.source):
            return {"method.source": self.source}
        return {}

    def check_model(self, cfg: Config, m) -> None:
        """A weights file or export folder in `source` is read and loaded as the run would
        (every key and shape checked), so a bad file is refused before the run starts."""
        from pathlib import Path
        source = self.inputs().get("method.source")
        if source is None or not Path(source).exists():
            return
        from converters import from_torch
        if (Path(source) / "arch.json").is_file():
            from_torch(source)  # an export: its graph is its own
        else:
            from_torch(source, arch=cfg.model.name)
