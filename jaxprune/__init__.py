"""jaxprune: make deep networks shallower without losing what they learned.

    import models, converters, jaxprune
    m = models.create("resnet18_cifar", num_classes=10)
    jaxprune.sites(m)                         # ordered activation-site names
    jaxprune.linearize(m, ["layer1.0.relu1"]) # identity at those sites, in place
"""
from jaxprune.errors import UserError
from jaxprune.sites import linearize, linearized, sites

__all__ = ["UserError", "linearize", "linearized", "sites"]
