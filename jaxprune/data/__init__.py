"""Input pipelines (grain) and the papers' data sets (DESIGN.md §8).

    from jaxprune import data
    info = data.describe("cifar10", "~/data")         # DatasetInfo; UserError when not prepared
    for batch in data.loader("digits", None, "train", batch_size=128, seed=0, epoch=3, train=True):
        batch = data.to_global(batch, mesh)           # {"image", "label", "mask"} sharded P('data')

`python -m jaxprune.data prepare NAME --root DIR` prepares a data set once;
`python -m jaxprune.data info NAME --root DIR` checks it. Sources and splits:
`jaxprune.data.sources`; batch layout, sharding and determinism: `jaxprune.data.pipeline`.
"""
from jaxprune.data.pipeline import Loader, loader, to_global
from jaxprune.data.prepare import prepare
from jaxprune.data.sources import SPLITS, DatasetInfo, available, clear_cache, describe

__all__ = ["SPLITS", "DatasetInfo", "Loader", "available", "clear_cache", "describe", "loader",
           "prepare", "to_global"]
