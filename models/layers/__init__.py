"""The layer vocabulary every jaxprune model is built from (one module per family of
kinds; `base.py` holds the protocol each kind declares).

Each layer is an NNX module with one job. Layers that own weights know their
PyTorch state-dict layout (`torch_state()` / `load_torch_state()`), and a model
names its layers exactly as the torch module paths, so converting a whole model
is a loop over layers. Layers avoid `padding='SAME'` and fast variance: both
silently break parity with torch weights (DESIGN.md §4).
"""
from models.layers.activation import ACTIVATIONS, GATES, Act
from models.layers.attention import PatchMerging, ShiftedWindowAttention
from models.layers.base import LINEAR_KINDS, Layer, Mask
from models.layers.combine import Add, Concat, Mul
from models.layers.conv import Conv, FusedConv, conv2d, conv_as_matmul
from models.layers.initializers import trunc_normal, uniform
from models.layers.linear import Linear, Scale
from models.layers.norm import BatchNorm, LayerNorm
from models.layers.pooling import (AdaptiveAvgPool, AvgPool, FlattenNCHW, GlobalAvgPool,
                                   MaxPool)
from models.layers.regularization import Dropout, StochasticDepth

__all__ = ["ACTIVATIONS", "GATES", "LINEAR_KINDS", "Act", "AdaptiveAvgPool", "Add", "AvgPool",
           "BatchNorm", "Concat", "Conv", "Dropout", "FlattenNCHW", "FusedConv", "GlobalAvgPool",
           "Layer", "LayerNorm", "Linear", "Mask", "MaxPool", "Mul", "PatchMerging", "Scale",
           "ShiftedWindowAttention", "StochasticDepth", "conv2d", "conv_as_matmul",
           "trunc_normal", "uniform"]
