"""The official EASIER training step (Quétu, Liao, Tartaglione, ECML PKDD 2024; its
published code, github.com/VGCQ/EASIER), reproduced in plain torch as the baseline of
`bench/train_step.py`. It never imports JAX.

What the published code does per training batch for ResNet-18 on CIFAR-10, and what
`make_step` therefore does:

* its own CIFAR ResNet-18: 3x3 stride-1 stem conv (no bias), BN, ReLU, 3x3/2 max-pool
  kept, four stages of two BasicBlocks (64-128-256-512, a 1x1 conv + BN shortcut where
  the shape changes), adaptive average pool, fc. Every ReLU is its own non-inplace module
  (17), the residual add is in place; kaiming-normal (fan_out) convs, BN weight 1, bias 0;
* `torch.use_deterministic_algorithms(True, warn_only=True)` and seeded RNGs, as its
  main script sets them; torch's default thread count (set by the measuring worker);
* a forward hook on every ReLU keeps the module's input;
* after the forward pass, per hooked layer: ON = z >= 0 and OFF = z < 0 counted over the
  batch and divided by the batch size, averaged over the spatial axes to one value per
  channel, binary entropy in bits (log2 of the probabilities clamped at 1e-10), mean over
  channels, written into a 17-element CPU tensor;
* the hook list cleared; cross-entropy, zero_grad, backward, SGD (lr 0.1, momentum 0.9,
  weight decay 1e-4);
* host reads every step: `loss.item()`, one `.item()` per layer's entropy, and
  `predicted.eq(labels).sum().item()`.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=k // 2, bias=False)


class Block(nn.Module):
    """BasicBlock: conv-bn-relu1-conv-bn, (+ downsample shortcut), in-place add, relu2."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv(cin, cout, 3, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv(cout, cout, 3)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y += x if self.downsample is None else self.downsample(x)
        return self.relu2(y)


class CifarResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = _conv(3, width, 3)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin, stages = width, []
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            first_stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(Block(cin, cout, first_stride), Block(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        return self.fc(x.reshape(x.size(0), -1))


class InputRecorder:
    """Forward hook that keeps the input tuple of every call, in call order."""

    def __init__(self):
        self.seen = []

    def __call__(self, module, inputs, output):
        self.seen.append(inputs)

    def clear(self):
        self.seen = []


def layer_entropy(z: torch.Tensor) -> torch.Tensor:
    """Per-channel binary entropy (bits) of ON = z >= 0, the published way:
    counts over the batch, divided by the batch size, then averaged over the
    trailing spatial dims one at a time."""
    n = z.shape[0]
    p_on = torch.sum(z >= torch.tensor(0), dim=0) / n
    p_off = torch.sum(z < torch.tensor(0), dim=0) / n
    while p_on.dim() > 1:
        p_on = torch.mean(p_on, dim=1)
        p_off = torch.mean(p_off, dim=1)
    return (-p_on * torch.log2(torch.clamp(p_on, min=1e-10))
            - p_off * torch.log2(torch.clamp(p_off, min=1e-10)))


def make_step(batch: int = 128, width: int = 64, seed: int = 0):
    """The official training step as a `jaxprune.measure` workload factory: one call runs
    one step, its host reads included."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    model = CifarResNet18(10, width)
    recorder = InputRecorder()
    handles = [m.register_forward_hook(recorder) for m in model.modules()
               if type(m) is nn.ReLU]
    assert len(handles) == 17, len(handles)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    running = {"entropy": torch.zeros(len(handles)), "loss": 0.0, "correct": 0, "total": 0}
    model.train()

    def step() -> None:
        out = model(x)
        per_layer = torch.zeros(len(handles))
        for k in range(len(handles)):
            per_layer[k] = torch.mean(layer_entropy(recorder.seen[k][0]))
        recorder.clear()
        loss = criterion(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        running["loss"] += loss.item()
        for k in range(len(running["entropy"])):
            running["entropy"][k] += per_layer[k].item()
        _, pred = out.max(1)
        running["total"] += y.size(0)
        running["correct"] += pred.eq(y).sum().item()
    return step
