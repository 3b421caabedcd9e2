"""Does a jaxprune model compute what its torch original computes?

`torch_pair` builds both sides from one source (random weights, a weights file,
torchvision's weights, or an export folder), `max_abs_diff` runs both in eval
mode on the same inputs. The torch side is the original architecture
(`converters.torch_reference`) loaded from the same weights, or an export's own
`model.pt2`, so the check covers the conversion, not a copy of it. `method:
parity` and the parity tests use them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxprune.config import TORCHVISION
from jaxprune.errors import UserError
from models.net import Net


def _torch_state(source: str, arch: str) -> dict[str, np.ndarray]:
    """The torch state dict of a file/folder or of torchvision's weights, as NumPy arrays."""
    from converters.pretrained import torchvision_state
    from converters.torch_in import read_file
    if source.startswith(TORCHVISION):
        return torchvision_state(source[len(TORCHVISION):], arch)
    state, _ = read_file(source)
    return state


def _load_into_torch(module, state: dict[str, np.ndarray], source: str) -> None:
    import torch
    result = module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                                    strict=False)
    # BatchNorm step counters are optional (jaxprune drops them on import).
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise UserError(f"{source} does not fit the torch original of this model "
                        f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})")


def _exported_program(folder: Path):
    """The export's model.pt2 as a callable that first checks the input sizes it was traced
    for (arch.json's `pt2`), so a size it does not take is one line naming the sizes."""
    import json

    from converters.torch_program import load_program  # torch.export.load would unpickle
    program = folder / "model.pt2"
    if not program.is_file():
        raise UserError(f"{folder} has arch.json but no model.pt2 to check it against; "
                        f"export it again with converters.export")
    module = load_program(program).module()  # traced in eval mode
    sizes = json.loads((folder / "arch.json").read_text()).get("pt2")

    def run(x):
        h, w = x.shape[2:]
        if sizes is not None and (
                sizes["dynamic"] and (h < sizes["min"][0] or w < sizes["min"][1])
                or not sizes["dynamic"] and [h, w] != sizes["size"]):
            taken = (f"inputs of at least {sizes['min'][0]}x{sizes['min'][1]}"
                     if sizes["dynamic"] else f"{sizes['size'][0]}x{sizes['size'][1]} inputs "
                                              f"only ({sizes['why']})")
            raise UserError(f"{program} was traced for {taken}, not {h}x{w}; check it at "
                            f"such a size")
        return module(x)
    return run


def torch_pair(arch: str, options: dict, num_classes: int, source: str, seed: int = 0):
    """(torch original, jaxprune model) holding the same weights, both in eval mode.

    `source`: "random" (the torch original of `arch` with `options`, randomly initialised
    with BatchNorm statistics randomised so that they matter), a weights file,
    `torchvision:<WEIGHTS>`, or a `converters.export` folder (checked against its own
    `model.pt2`, which loads without jaxprune)."""
    from converters import torch_reference
    from converters.torch_in import from_torch
    if source == "random":
        t = torch_reference.build(arch, num_classes=num_classes, seed=seed, **options)
        torch_reference.randomize(t, seed)
        m = from_torch(t, arch=arch)
    elif (Path(source) / "arch.json").is_file():
        # A jaxprune export (possibly pruned and fused): there is no torch original to rebuild.
        m = from_torch(source)
        m.eval()
        return _exported_program(Path(source)), m
    else:
        state = _torch_state(source, arch)
        # A file goes in by path so that an export folder's arch.json is honoured.
        m = from_torch(state if source.startswith(TORCHVISION) else source, arch=arch)
        # The torch side is rebuilt from what the weights say (class count, width)
        # and loaded from the original weights, not from jaxprune's conversion of them.
        t = torch_reference.build(m.spec.arch, num_classes=m.spec.num_classes,
                                  **dict(m.spec.options))
        _load_into_torch(t, state, source)
    m.eval()
    return t.eval(), m


def max_abs_diff(t, m: Net, x: np.ndarray) -> float:
    """Largest |logit difference| of torch module `t` and model `m` on NHWC images `x`."""
    import jax
    import torch
    from flax import nnx
    graphdef, state = nnx.split(m)
    # jaxprune first: a fused model names the input size it was fused for
    out = np.asarray(jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, x))
    with torch.no_grad():
        ref = t(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    if out.shape != ref.shape:
        raise UserError(f"logits of shape {out.shape} (jaxprune) vs {ref.shape} (torch)")
    return float(np.max(np.abs(out - ref)))
