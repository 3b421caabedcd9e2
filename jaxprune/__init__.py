"""jaxprune: make deep networks shallower without losing what they learned.

    import models, converters, jaxprune
    m = models.create("resnet18_cifar", num_classes=10)
    jaxprune.sites(m)                         # ordered activation-site names
    jaxprune.linearize(m, ["layer1.0.relu1"]) # identity at those sites, in place

The public names load on first use: `models` imports `jaxprune.errors`, so an
eager import of the passes here (which import `models`) would be circular.
A submodule must never share its name with a public function here: importing
the submodule would rebind `jaxprune.<name>` to the module.
"""
import importlib

# public name -> module that defines it; add new public API here
_EXPORTS = {
    "UserError": "jaxprune.errors",
    "sites": "jaxprune.activation_sites",
    "linearize": "jaxprune.activation_sites",
    "linearized": "jaxprune.activation_sites",
    "site_entropy": "jaxprune.methods.easier.entropy",
    "merge": "jaxprune.merging.fuse",
    "profile": "jaxprune.merging.profiling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxprune' has no attribute {name!r}")
