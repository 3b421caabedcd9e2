"""`method: parity` — does jaxprune compute what the torch checkpoint computes?

Imports a torch model into jaxprune (`converters.from_torch`), runs both in
eval mode on the same random inputs at each size, prints the largest logit
difference against the documented tolerance (DESIGN.md §4) and writes
results.json. Fails (exit status 2) when any size is outside the tolerance.

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
import json
from pathlib import Path

import numpy as np

from jaxprune.config import Config, MethodConfig
from jaxprune.errors import UserError
from jaxprune.methods import register

TORCHVISION = "torchvision:"


@dataclasses.dataclass(frozen=True)
class ParityConfig(MethodConfig):
    name: str = "parity"
    # random | a .pth/.pt/.safetensors file or export folder | torchvision:<WEIGHTS>
    source: str = "random"
    sizes: list[int] = dataclasses.field(default_factory=list)  # square input sizes; empty: native
    batch: int = 2


def _torch_state(source: str, arch: str) -> dict[str, np.ndarray]:
    """The torch state dict of a file/folder or of torchvision's weights, as NumPy arrays."""
    import converters
    if source.startswith(TORCHVISION):
        from converters.pretrained import _torchvision_state
        return _torchvision_state(source[len(TORCHVISION):], arch)
    state, _ = converters.read_file(source)
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


def models_pair(cfg: Config):
    """(torch original, jaxprune model) holding the same weights, both in eval mode."""
    import converters
    from converters import torch_reference
    from jaxprune import runner
    arch, source = cfg.model.name, cfg.method.source
    if source == "random":
        t = torch_reference.build(arch, num_classes=runner.num_classes(cfg), seed=cfg.seed,
                                  **cfg.model.options)
        torch_reference.randomize(t, cfg.seed)
        m = converters.from_torch(t, arch=arch)
    elif (Path(source) / "arch.json").is_file():
        # A jaxprune export (possibly pruned and fused): there is no torch original to rebuild,
        # so the model is checked against its own torch.export program, loaded without jaxprune.
        m = converters.from_torch(source)
        m.eval()
        return _exported_program(Path(source)), m
    else:
        state = _torch_state(source, arch)
        # A file goes in by path so that an export folder's arch.json is honoured.
        m = converters.from_torch(state if source.startswith(TORCHVISION) else source, arch=arch)
        # The torch side is rebuilt from what the weights say (class count, width)
        # and loaded from the original weights, not from jaxprune's conversion of them.
        t = torch_reference.build(m.spec.arch, num_classes=m.spec.num_classes,
                                  **dict(m.spec.options))
        _load_into_torch(t, state, source)
    m.eval()
    return t.eval(), m


def _exported_program(folder: Path):
    import torch
    program = folder / "model.pt2"
    if not program.is_file():
        raise UserError(f"{folder} has arch.json but no model.pt2 to check it against; "
                        f"export it again with converters.export")
    return torch.export.load(str(program)).module()  # traced in eval mode


def _max_abs_diff(t, m, x: np.ndarray) -> float:
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


def _table(rows: list[dict]) -> str:
    lines = [f"{'size':>6}  {'max |Δ logits|':>14}  {'tolerance':>9}  result"]
    for r in rows:
        lines.append(f"{r['size']:>6}  {r['max_abs_diff']:>14.3e}  {r['tolerance']:>9.1e}  "
                     f"{'pass' if r['passed'] else 'FAIL'}")
    return "\n".join(lines)


@register("parity", config=ParityConfig)
def run(cfg: Config, run_dir: Path) -> dict:
    from converters import torch_reference
    opts: ParityConfig = cfg.method
    if cfg.model.pretrained:
        raise UserError("method parity checks the weights named by method.source; "
                        "model.pretrained is not used: move it to method.source")
    if opts.batch < 1 or any(s < 1 for s in opts.sizes):
        raise UserError(f"method.batch and method.sizes must be positive, got batch "
                        f"{opts.batch}, sizes {opts.sizes}")
    t, m = models_pair(cfg)
    tol = torch_reference.tolerance(m.spec.arch)
    sizes = opts.sizes or [m.spec.input_size[0]]
    rng = np.random.default_rng(cfg.seed)
    rows = []
    for size in sizes:
        x = rng.standard_normal((opts.batch, size, size, m.spec.in_channels), dtype=np.float32)
        diff = _max_abs_diff(t, m, x)
        rows.append({"size": size, "max_abs_diff": diff, "tolerance": tol,
                     "passed": bool(diff <= tol)})  # NaN fails
    print(f"parity: {m.spec.arch} {dict(m.spec.options)} with {m.spec.num_classes} classes, "
          f"source {opts.source}, batch {opts.batch}, float32, eval mode")
    print(_table(rows))
    results = {"method": "parity", "model": m.spec.arch, "options": dict(m.spec.options),
               "num_classes": m.spec.num_classes, "source": opts.source, "batch": opts.batch,
               "rows": rows, "passed": all(r["passed"] for r in rows)}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if not results["passed"]:
        bad = ", ".join(f"{r['size']} px: {r['max_abs_diff']:.3e}" for r in rows if not r["passed"])
        raise UserError(f"parity failed for {m.spec.arch} ({bad}; tolerance {tol:.1e}); "
                        f"details in {run_dir / 'results.json'}")
    return results
