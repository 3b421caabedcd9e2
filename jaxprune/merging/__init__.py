"""The step that makes a network shallower: fold, fuse, profile (DESIGN.md §7).

    small, report = jaxprune.merge(m, return_report=True)   # new Net, same function
    print(report)                                           # depth/params/MACs before and after
    jaxprune.profile(small, (32, 32), latency=["jax", "torch"])
"""
from jaxprune.merging.fuse import COST_MODELS, MergeReport, merge
from jaxprune.merging.layers import FusedConv
from jaxprune.merging.profiling import Profile, profile

__all__ = ["COST_MODELS", "FusedConv", "MergeReport", "Profile", "merge", "profile"]
