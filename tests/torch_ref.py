"""Shared helpers for tests that compare jaxprune models with their torch originals, and
`OwnNet`, a hand-written classifier no builder knows (imported through its graph)."""
import numpy as np
import torch
from torch import nn

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


def ready(module: torch.nn.Module, seed: int, calib_size: int) -> torch.nn.Module:
    """Random weights and BN statistics whose scale fits the data; eval mode.

    `randomize` alone draws running statistics unrelated to the activations, and
    after ~50 layers the logits no longer depend on the input (every image gives
    the same logits, so parity would prove little). Here each BatchNorm's statistics
    are measured on what reaches it from random images of `calib_size`, through the
    layers before it as they finally are, then perturbed at random (`calibrate`): every
    layer's output keeps a scale near 1, however deep the network, at sizes near
    `calib_size`. Linear layers get torch's default init:
    torchvision's N(0, 0.01) classifiers give logits near 1e-2. Parameters initialised
    to a constant (ConvNeXt's 1e-6 layer scales, LayerNorm affines, zero biases) get
    random values, so that what they scale counts.
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                if float(p.flatten()[0]) == 0.0:
                    p.normal_(0.0, 0.1)
                else:
                    p.uniform_(0.5, 1.5)
    for mod in module.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.reset_parameters()
    randomize(module, seed)
    return calibrate(module, seed, calib_size)


def calibrate(module: torch.nn.Module, seed: int, size: int) -> torch.nn.Module:
    """Each BatchNorm's running statistics measured on what reaches it from random images
    of `size`, through the layers before it as they finally are (a pre-hook, in forward
    order), then perturbed at random; eval mode."""
    g = torch.Generator().manual_seed(seed + 1)

    def measure(bn, inputs):
        x = inputs[0].transpose(0, 1).flatten(1)
        mean, var = x.mean(1), x.var(1)
        bn.running_mean.copy_(mean + torch.randn(bn.num_features, generator=g) * 0.3 * var.sqrt())
        bn.running_var.copy_(var * (torch.rand(bn.num_features, generator=g) + 0.5))

    hooks = [mod.register_forward_pre_hook(measure) for mod in module.modules()
             if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        module.eval()(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(seed)))
    for hook in hooks:
        hook.remove()
    return module


# -- a classifier written by hand: what `converters.trace` imports for "your own model" -------

class SqueezeExcite(nn.Module):
    """Squeeze-excitation written with tensor methods: mean, then a sigmoid gate."""

    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.SiLU(), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class ChannelsLastBlock(nn.Module):
    """ConvNeXt-style: dilated depthwise conv, then LayerNorm, MLP and a per-channel layer
    scale on a channels-last (permuted) tensor, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=2, dilation=2, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc, self.act, self.proj = nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.proj(self.act(self.fc(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class OwnNet(nn.Module):
    """conv-bn-relu, squeeze-excitation, a concatenated branch, hardswish, a channels-last
    block, average pooling, a hardsigmoid gate, max pooling, the first ReLU module called
    a second time, adaptive pooling to 2x2, flatten and a linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.se = SqueezeExcite(16)
        self.branch = nn.Conv2d(16, 8, 1)
        self.hs = nn.Hardswish()
        self.block = ChannelsLastBlock(24)
        self.pool = nn.AvgPool2d(2)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(24, 24, 1), nn.Hardsigmoid())
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.head_pool = nn.AdaptiveAvgPool2d((2, 2))
        self.fc = nn.Linear(24 * 4, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.se(x)
        x = torch.cat([x, self.branch(x)], dim=1)
        x = self.block(self.hs(x))
        x = x * self.gate(self.pool(x))
        x = self.relu(self.maxpool(x))
        return self.fc(torch.flatten(self.head_pool(x), 1))


class Upsampler(nn.Module):
    """A classifier with an op jaxprune has no layer for (nearest upsampling)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.up(self.conv(x)).mean((2, 3)))
