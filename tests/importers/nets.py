"""Small torch networks shared by the importer tests (ONNX and pt2): MLP, CNN, ResNet-style."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def mlp_net() -> nn.Module:
    """12 → 32 → BN → ReLU → Dropout → 16 → ReLU → 3."""
    return nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def cnn_net() -> nn.Module:
    """Input (1, 12, 12): conv → BN → ReLU → padded max-pool → conv → ReLU → avg-pool → head."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),                     # 12 → 6
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AvgPool2d(2),                                          # 6 → 3
        nn.Flatten(), nn.Linear(6 * 3 * 3, 10), nn.ReLU(), nn.Linear(10, 4))


class _Block(nn.Module):
    """relu(x + f(x)); strided blocks use a 1×1 strided conv + BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(h)))


class ResNetSmall(nn.Module):
    """Input (3, 16, 16): stem, two residual blocks (second strided), GAP, linear head."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = _Block(8, 8, 1)
        self.block2 = _Block(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(self.stem(x)))
        return self.head(torch.flatten(self.pool(h), 1))


def resnet_net() -> nn.Module:
    return ResNetSmall()


# name → (constructor, per-sample input shape, number of outputs)
NETS: dict[str, tuple] = {
    "mlp": (mlp_net, (12,), 3),
    "cnn": (cnn_net, (1, 12, 12), 4),
    "resnet": (resnet_net, (3, 16, 16), 5),
}


def train_briefly(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 5, lr: float = 0.05
                  ) -> nn.Module:
    """A few SGD steps on (x, y) so BatchNorm statistics and weights are not at their defaults;
    returns the net in eval mode."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def trained(name: str, seed: int = 0, n: int = 64) -> tuple[nn.Module, tuple[int, ...]]:
    """The named net, trained briefly on seeded random data; (net in eval mode, input shape)."""
    make, shape, k = NETS[name]
    torch.manual_seed(seed)
    net = make()
    x = torch.randn(n, *shape)
    y = torch.randint(0, k, (n,))
    return train_briefly(net, x, y), shape


def teacher_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """3×16×16 images whose class (of 5) is the argmax of a fixed projection of their quadrant
    means: learnable by the ResNet, the same labelling for every seed."""
    gen = np.random.default_rng(seed)
    x = gen.standard_normal((n, 3, 16, 16)).astype(np.float32)
    quads = x.reshape(n, 3, 2, 8, 2, 8).mean(axis=(3, 5)).reshape(n, -1) * 8
    proj = np.random.default_rng(99).standard_normal((12, 5))
    return x, (quads @ proj).argmax(1).astype(np.int64)
