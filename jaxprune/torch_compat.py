"""The single import point for torchvision and timm.

torchvision 0.28.0 on PyPI is a CUDA build; beside the CPU torch wheel its C
extension fails to load and `import torchvision` raises "operator
torchvision::nms does not exist". Declaring the two op schemas it registers
at import time lets the pure-Python parts (models, transforms) load
(DESIGN.md §2). timm imports torchvision itself, so it goes through here too.
"""
import functools

import torch

_LIBRARY = None  # kept alive: dropping the Library object unregisters the schemas


def _declare_torchvision_ops() -> None:
    global _LIBRARY
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return  # a working torchvision extension (or an earlier call) declared them
    except RuntimeError:
        pass
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


@functools.cache
def torchvision():
    """`import torchvision`, working beside the CPU torch wheel."""
    _declare_torchvision_ops()
    import torchvision as tv
    return tv


@functools.cache
def timm():
    """`import timm` (which imports torchvision) through the same workaround."""
    torchvision()
    import timm as t
    return t
