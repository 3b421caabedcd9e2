"""From a validated config to a model and a method run."""
from __future__ import annotations

from jaxprune.config import Config
from models.net import Net


def build_model(cfg: Config, num_classes: int) -> Net:
    """The config's model: `model.num_classes` (else the data set's count), `model.options`,
    seeded by `seed`, starting from `model.pretrained` when given."""
    import models
    from converters import load_pretrained
    m = models.create(cfg.model.name, num_classes=cfg.model.num_classes or num_classes,
                      seed=cfg.seed, **cfg.model.options)
    if cfg.model.pretrained:
        load_pretrained(m, cfg.model.pretrained)
    return m
