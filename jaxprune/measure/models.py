"""Latency of jaxprune models, in JAX and in torch, through `jaxprune.measure`.

In JAX a model is timed as itself (jit, eval mode). In torch it is timed as what a user
runs: an unmodified architecture (every site nonlinear, the builder's own graph) as its
torch original, torchvision's or timm's own module (`converters.torch_reference`); any
other model (linearized, edited, fused) as its `converters.export` program `model.pt2`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from jaxprune.measure import Timings, Workload, measure
from models.net import Net

FACTORIES = "jaxprune.measure.workloads"


def is_original(m: Net) -> bool:
    """Whether `m` is its architecture as built (same graph, every site nonlinear, not
    fused): then its torch original computes the same function."""
    import numpy as np
    from flax import nnx

    import models
    from converters.torch_reference import BUILDERS
    options = dict(m.spec.options)
    if options.get("fused") or m.spec.arch not in BUILDERS:
        return False
    if any(np.any(np.asarray(m.layers[s].mask.value) != 1) for s in m.sites()):
        return False
    built = nnx.eval_shape(lambda: models.create(m.spec.arch, num_classes=m.spec.num_classes,
                                                 **options))
    return tuple(built.graph) == tuple(m.graph)


def workloads(name: str, m: Net, hw, *, batch: int, runtimes, program: Path | None = None,
              scratch: Path | None = None) -> list[Workload]:
    """`m`'s workloads, one per runtime, named `<name> <runtime>`. `program`: a folder
    holding `m`'s export (`model.pt2`); else one is written under `scratch` when torch
    needs it."""
    from converters.torch_arch import arch_dict
    size = [int(hw[0]), int(hw[1])]
    out = []
    for runtime in runtimes:
        if runtime == "jax":
            out.append(Workload(f"{name} jax", "jax", f"{FACTORIES}:jax_model",
                                {"batch": batch, "input_size": size, "arch": arch_dict(m)}))
        elif program is None and is_original(m):
            out.append(Workload(f"{name} torch", "torch", f"{FACTORIES}:torch_original",
                                {"arch": m.spec.arch, "options": dict(m.spec.options),
                                 "num_classes": m.spec.num_classes, "batch": batch,
                                 "input_size": size}))
        else:
            if program is None:
                import converters
                program = converters.export(m, Path(scratch) / name)
            out.append(Workload(f"{name} torch", "torch", f"{FACTORIES}:torch_program",
                                {"folder": str(program), "batch": batch, "input_size": size,
                                 "in_channels": m.spec.in_channels}))
    return out


def model_latency(models_: dict[str, Net], hw, *, batch: int = 1, runtimes=("jax", "torch"),
                  programs: dict[str, Path] | None = None, rounds: int = 3, bursts: int = 3,
                  repeats: int = 20, threads: int | None = None,
                  save: Path | None = None) -> Timings:
    """Time each named model in each runtime, every workload in its own process, the
    models alternating burst by burst, `bursts` bursts of `repeats` calls in each of
    `rounds` rounds of fresh processes (`jaxprune.measure.measure`; `threads`: its torch
    threads and JAX host devices, default one per core). Workload names are
    `<model name> <runtime>`."""
    programs = programs or {}
    with tempfile.TemporaryDirectory(prefix="jaxprune-latency-") as scratch:
        ws = [w for name, m in models_.items()
              for w in workloads(name, m, hw, batch=batch, runtimes=runtimes,
                                 program=programs.get(name), scratch=Path(scratch))]
        return measure(ws, rounds=rounds, bursts=bursts, repeats=repeats, threads=threads,
                       save=save)
