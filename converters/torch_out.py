"""jaxprune models out to PyTorch: a module, an export folder, or the torchvision original.

    tm = converters.to_torch(m)            # any Net: dense, linearized or fused; eval mode
    converters.export(m, "out/")           # model.safetensors + arch.json + model.pt2
    tv = converters.to_torchvision(m)      # a linearized torchvision architecture as itself

`to_torch` executes the model's graph with one torch module per layer
(`torch_layers.py`), named by the layer's path, so for an unfused model its
state dict *is* the torchvision / timm state dict. NCHW images in, logits out.

The export folder: `model.safetensors` (the torch-layout state dict),
`arch.json` (spec, graph, masks: `converters.from_torch(folder)` rebuilds
the model from it, fused or not) and `model.pt2` (`torch.export` of the
module, batch dimension dynamic, height and width too where the graph allows),
which loads with `torch.export.load(path).module()` in a process that never
imports jaxprune.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jaxprune.errors import UserError
from models.net import INPUT, Net, size_refusal

from converters.torch_arch import arch_dict
from converters.torch_in import torch_state_dict
from converters.torch_layers import Act, torch_layer


def _layout(t: torch.Tensor, channels_first: bool, want: bool) -> torch.Tensor:
    if t.dim() != 4 or channels_first == want:
        return t
    return t.permute(0, 3, 1, 2) if want else t.permute(0, 2, 3, 1)


def _attach(root: nn.Module, name: str, module: nn.Module) -> None:
    """Register `module` at the dotted path `name` (containers made as needed), so the
    state dict keys are the torch module paths the layer names already are. A layer may
    sit at the path of a module holding others, as torch's own modules do (ConvNeXt's
    block keeps its layer scale beside its sub-layers): it takes over their container."""
    *parents, leaf = name.split(".")
    node = root
    for p in parents:
        if p not in node._modules:
            node.add_module(p, nn.Module())
        node = node._modules[p]
    held = node._modules.get(leaf)
    if held is not None and type(held) is not nn.Module:
        raise UserError(f"to_torch: two layers at the torch path {name!r}")
    if held is not None:
        for child, sub in held._modules.items():
            module.add_module(child, sub)
    node.add_module(leaf, module)


class TorchNet(nn.Module):
    """A jaxprune `Net` as a torch module, executing the same graph."""

    def __init__(self, m: Net):
        super().__init__()
        self.steps = []
        for name, inputs in m.graph:
            module = torch_layer(m.layers[name], name)
            _attach(self, name, module)
            self.steps.append((name, tuple(inputs), module))
        self.output = m.graph[-1][0]
        # a merged model's border terms hold from one size on, or at one size only
        self.input_sizes = m.input_sizes()

    def forward(self, x):
        if self.input_sizes is not None and (why := size_refusal(self.input_sizes, *x.shape[2:4])):
            raise ValueError(f"{why}, or merge the linearized model for your input size "
                             f"(jaxprune.merge(m, input_size=(H, W))) and re-export")
        env = {INPUT: (x, True)}
        for name, inputs, module in self.steps:
            if module.layout == "same":  # elementwise: the layout its first input has
                cf = env[inputs[0]][1]
                args = [_layout(*env[i], cf) for i in inputs]
                env[name] = (module(*args, channels_first=cf), cf)
            else:
                cf = module.layout == "nchw"
                env[name] = (module(*[_layout(*env[i], cf) for i in inputs]), cf)
        return _layout(*env[self.output], True)


def _tensors(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}


def to_torch(m: Net) -> TorchNet:
    """A torch module computing `m` in eval mode (NCHW float32 in, logits out)."""
    if not isinstance(m, Net):
        raise UserError(f"to_torch takes a jaxprune model (models.Net), not {type(m).__name__}")
    tm = TorchNet(m)
    tm.load_state_dict(_tensors(torch_state_dict(m, with_counters=True)), strict=True)
    return tm.eval()


def pt2_sizes(m: Net) -> dict:
    """The input sizes `export` traces `model.pt2` for: {"dynamic": True, "min": [H, W]}
    (every size from there on), or {"dynamic": False, "size": [H, W], "why": ...} where
    the model is fixed to one size or its graph fixes it in torch.export. torch.export
    takes a dynamic size to be at least 2, so `min` is also where every map of the
    network has at least 2 rows and columns."""
    from jaxprune.merging.profiling import smallest_input, tensor_shapes
    hw = tuple(m.spec.input_size)
    fixed = {"dynamic": False, "size": list(hw)}
    rule = m.input_sizes()
    if rule is not None and rule[0] == "fixed":
        return {**fixed, "why": "the fused model is made for this input size only"}
    for name, layer in m.named_layers():
        if not type(layer).torch_dynamic_size:
            return {**fixed, "why": f"torch.export traces layer {name!r} "
                                    f"({type(layer).__name__}) at one input size"}
    least = rule[1] if rule is not None else (1, 1)

    def holds(shapes, axis):
        return all(s[axis + 1] >= 2 for s in shapes.values() if len(s) == 4) \
            and shapes[INPUT][axis + 1] >= least[axis]
    native = tensor_shapes(m, hw)
    if not (holds(native, 0) and holds(native, 1)):
        return {**fixed, "why": f"a map of the network has a single row or column at "
                                f"{hw[0]}x{hw[1]}"}
    return {"dynamic": True, "min": list(smallest_input(m, hw, holds))}


def export(m: Net, out_dir: str | os.PathLike, *, batch: int = 2) -> Path:
    """Write `model.safetensors`, `arch.json` and `model.pt2` for `m` into `out_dir`.

    `model.pt2` is traced on `batch` images of the model's input size with a
    dynamic batch dimension, and dynamic height and width from the smallest size the
    model takes where the graph allows (`pt2_sizes`, recorded in arch.json as
    `pt2`; the program then refuses smaller inputs). Returns the folder.
    """
    from safetensors.numpy import save_file
    tm = to_torch(m)  # refuses a layer without a torch counterpart before writing anything
    arch = {**arch_dict(m), "pt2": pt2_sizes(m)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: np.ascontiguousarray(v) for k, v in torch_state_dict(m, with_counters=True).items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "arch.json").write_text(json.dumps(arch, indent=1) + "\n")
    h, w = m.spec.input_size
    example = torch.randn(batch, m.spec.in_channels, h, w, generator=torch.Generator().manual_seed(0))
    dims = {0: torch.export.Dim("batch", min=1)}
    if arch["pt2"]["dynamic"]:
        mh, mw = arch["pt2"]["min"]
        dims.update({2: torch.export.Dim("height", min=mh), 3: torch.export.Dim("width", min=mw)})
    with torch.no_grad():
        program = torch.export.export(tm, (example,), dynamic_shapes=(dims,))
    torch.export.save(program, str(out / "model.pt2"))
    return out


# -- a linearized model as its own torchvision / timm architecture ----------------------

class _SplitActBasicBlock(nn.Module):
    """torchvision's BasicBlock with its one ReLU module split into its two call sites
    (`act1` mid-block, `act2` after the sum), so each can be an identity. No new state."""

    def forward(self, x):
        identity = x
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.act2(out + identity)


@functools.cache
def _split_block_class(base: type) -> type:
    return type("SplitActBasicBlock", (_SplitActBasicBlock, base), {})


class _ChannelsFirst(nn.Module):
    """A partially masked site (SNL) inside an NCHW torch model."""

    def __init__(self, act: Act):
        super().__init__()
        self.act = act

    def forward(self, x):
        return self.act(x, channels_first=True)


def _site_module(m: Net, site: str) -> nn.Module | None:
    act = Act(m.layers[site])
    if act.mode == "act":
        return None
    return nn.Identity() if act.mode == "identity" else _ChannelsFirst(act)


def _site_path(t: nn.Module, m: Net, site: str) -> str | None:
    """The torch module path of a site: its own name, or the activation slot after the
    layer it reads (torchvision's Conv2dNormActivation `.2`, the MLP's `.1`)."""
    modules = dict(t.named_modules())
    if site in modules:
        return site
    head, _, last = dict(m.graph)[site][0].rpartition(".")
    if last.isdigit() and f"{head}.{int(last) + 1}" in modules:
        return f"{head}.{int(last) + 1}"
    return None


def _check_acts(t: nn.Module, path: str, site: str) -> None:
    act = t.get_submodule(path)
    if not isinstance(act, (nn.ReLU, nn.ReLU6, nn.GELU)):
        raise UserError(f"to_torchvision: site {site!r} maps to {path!r}, a "
                        f"{type(act).__name__}, not an activation")


def to_torchvision(m: Net) -> nn.Module:
    """`m` (unfused) as the torch architecture it reproduces (`converters.torch_reference`:
    torchvision, or timm for MobileNetV2's timm layout) with identities at linearized sites,
    weights loaded with `load_state_dict(strict=True)`. Eval mode."""
    from models.registry import create

    from converters.torch_reference import BUILDERS, build
    options = dict(m.spec.options)
    if options.get("fused") or m.spec.arch not in BUILDERS:
        what = "a fused model" if options.get("fused") else repr(m.spec.arch)
        raise UserError(f"to_torchvision: {what} has no torchvision/timm form; "
                        f"use converters.to_torch")
    reference = create(m.spec.arch, num_classes=m.spec.num_classes, **options)
    if tuple(reference.graph) != tuple(m.graph):
        extra = sorted(set(m.layers) - set(reference.layers))
        raise UserError(f"to_torchvision: the model's graph differs from {m.spec.arch!r}'s "
                        f"(added layers: {extra[:5]}); use converters.to_torch")
    t = build(m.spec.arch, m.spec.num_classes, **options)
    for site in m.sites():
        new = _site_module(m, site)
        if new is None:
            continue
        block = re.fullmatch(r"(layer\d+\.\d+)\.relu([12])", site)
        if block:  # torchvision's BasicBlock calls one ReLU twice: split it
            blk = t.get_submodule(block.group(1))
            if not isinstance(blk, _SplitActBasicBlock):
                blk.act1, blk.act2 = blk.relu, blk.relu
                blk.__class__ = _split_block_class(type(blk))
            setattr(blk, f"act{block.group(2)}", new)
            continue
        path = _site_path(t, m, site)
        if path is None:
            raise UserError(f"to_torchvision: no torch module for site {site!r}")
        _check_acts(t, path, site)
        t.set_submodule(path, new)
    t.load_state_dict(_tensors(torch_state_dict(m, with_counters=True)), strict=True)
    return t.eval()
