"""Small torch networks with the piecewise-linear layers beyond ReLU (shared by the importer tests)."""

from __future__ import annotations

import torch
from torch import nn

from tests.importers.nets import train_briefly


def leaky_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.LeakyReLU(0.1), nn.Linear(16, 12), nn.PReLU(12),
                         nn.Linear(12, 3))


def relu6_cnn() -> nn.Module:
    """Input (1, 9, 9): ReLU6, ceil_mode max-pool, rectangular kernel, Hardtanh, per-channel PReLU."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),                           # 9 → 5
        nn.Conv2d(4, 6, (3, 1), padding=(1, 0), dilation=(1, 1)), nn.Hardtanh(-1.0, 1.0),
        nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False),  # 5 → 3
        nn.Conv2d(6, 6, 3, padding=2, dilation=2), nn.PReLU(6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def conv1d_net() -> nn.Module:
    """Input (2, 20): a 1-D CNN (time series): Conv1d, ReLU, ceil_mode MaxPool1d, dilated Conv1d,
    LeakyReLU, AvgPool1d, global average pooling, linear head."""
    return nn.Sequential(
        nn.Conv1d(2, 6, 5, padding=2), nn.BatchNorm1d(6), nn.ReLU(),
        nn.MaxPool1d(3, stride=2, ceil_mode=True),                 # 20 → 10
        nn.Conv1d(6, 8, 3, dilation=2, padding=1), nn.LeakyReLU(0.2),  # 10 → 8
        nn.AvgPool1d(2),                                           # 8 → 4
        nn.Conv1d(8, 8, 3, padding=1), nn.ReLU6(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 3))


# name → (constructor, per-sample input shape, number of outputs)
PL_NETS: dict[str, tuple] = {
    "leaky_prelu_mlp": (leaky_mlp, (10,), 3),
    "relu6_cnn": (relu6_cnn, (1, 9, 9), 4),
    "conv1d": (conv1d_net, (2, 20), 3),
}


def pl_trained(name: str, seed: int = 0, n: int = 64) -> tuple[nn.Module, tuple[int, ...]]:
    make, shape, k = PL_NETS[name]
    torch.manual_seed(seed)
    net = make()
    x = torch.randn(n, *shape) * 2
    return train_briefly(net, x, torch.randint(0, k, (n,))), shape
