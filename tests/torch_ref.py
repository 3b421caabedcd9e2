"""Shared helpers for tests that compare jaxprune models with their torch originals."""
import numpy as np
import torch

from converters.torch_reference import randomize  # noqa: F401  (re-exported for tests)
from jaxprune.torch_compat import timm, torchvision  # noqa: F401  (re-exported for tests)


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """NHWC float32 inputs."""
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def torch_logits(module: torch.nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def jax_logits(m, x_nhwc: np.ndarray) -> np.ndarray:
    m.eval()
    return np.asarray(m(x_nhwc))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


class IdentityAt(torch.nn.Module):
    """Replaces one call of an activation: identity on the `index`-th call, `act` otherwise."""

    def __init__(self, act: torch.nn.Module, index: int):
        super().__init__()
        self.act, self.index, self.calls = act, index, 0

    def forward(self, x):
        i, self.calls = self.calls, self.calls + 1
        return x if i == self.index else self.act(x)
