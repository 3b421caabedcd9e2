"""Flax NNX models whose activations are maskable sites.

    import models
    m = models.create("resnet18_cifar", num_classes=10, seed=0)
    models.available()
"""
from models.net import Block, GraphBuilder, ModelSpec, Net
from models.registry import available, blocks, create, detect, entry, match, register

__all__ = ["Block", "GraphBuilder", "ModelSpec", "Net", "available", "blocks", "create", "detect",
           "entry", "match", "register"]
