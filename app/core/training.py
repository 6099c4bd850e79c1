"""Training: full (SK + QK) training of a ReLU net, and QK-only training of an Estimator.

Both loops share one epoch driver: seeded mini-batches, a validation split, early stopping
on validation loss with the best weights restored, per-epoch metrics, a cancel hook.
Full training also records SK stability (Hypothesis 1) on a fixed probe set.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from app.core.data import Split
from app.core.device import pick_device
from app.core.network import DecoupledModel, PathSelector, ReLUNet
from app.core.structure import PackedStructure, gate_flip_fraction, pool_flip_fraction

EpochCallback = Callable[[dict[str, Any]], None]
CancelCheck = Callable[[], bool]
ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, row indices) → logits


class TrainingCancelled(RuntimeError):
    """Raised between epochs when the cancel hook says so."""


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5  # epochs without validation-loss improvement before stopping
    seed: int = 0
    device: str | None = None  # None/"auto": CUDA when available
    probe_size: int = 512  # samples whose gates are tracked for SK stability
    eval_batch_size: int = 4096


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    best_val_acc: float = 0.0
    wall_s: float = 0.0
    structure_s: float = 0.0  # time spent computing the cached structure (QK only)

    def summary(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
                "best_val_acc": self.best_val_acc, "epochs_run": len(self.history),
                "wall_s": self.wall_s, "structure_s": self.structure_s}


@torch.no_grad()
def evaluate(forward: ForwardFn, data: Split, batch_size: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``forward`` on ``data``."""
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(data)), device=data.x.device)
        logits = forward(data.x[rows], rows)
        total_loss += float(F.cross_entropy(logits, data.y[rows], reduction="sum"))
        correct += int((logits.argmax(1) == data.y[rows]).sum())
    n = max(len(data), 1)
    return total_loss / n, correct / n


def _run_epochs(module: nn.Module, params: list[nn.Parameter], train_fwd: ForwardFn,
                val_fwd: ForwardFn, train: Split, val: Split, cfg: TrainConfig,
                on_epoch: EpochCallback | None, should_cancel: CancelCheck | None,
                extra_metrics: Callable[[], dict[str, Any]] | None = None) -> TrainResult:
    result = TrainResult()
    start = time.perf_counter()
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    best_state = copy.deepcopy(module.state_dict())
    stale = 0
    for epoch in range(1, cfg.epochs + 1):
        if should_cancel is not None and should_cancel():
            raise TrainingCancelled(f"cancelled before epoch {epoch}")
        epoch_start = time.perf_counter()
        module.train()
        order = torch.randperm(len(train), generator=generator).to(train.x.device)
        loss_sum = 0.0
        for i in range(0, len(train), cfg.batch_size):
            rows = order[i:i + cfg.batch_size]
            loss = F.cross_entropy(train_fwd(train.x[rows], rows), train.y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * rows.numel()
        module.eval()
        val_loss, val_acc = evaluate(val_fwd, val, cfg.eval_batch_size)
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / len(train),
                                   "val_loss": val_loss, "val_acc": val_acc}
        if extra_metrics is not None:
            metrics.update(extra_metrics())
        metrics["seconds"] = time.perf_counter() - epoch_start
        result.history.append(metrics)
        if val_loss < result.best_val_loss:
            result.best_val_loss, result.best_val_acc, result.best_epoch = val_loss, val_acc, epoch
            best_state = copy.deepcopy(module.state_dict())
            stale = 0
        else:
            stale += 1
        if on_epoch is not None:
            on_epoch(metrics)
        if stale >= cfg.patience:
            break
    module.load_state_dict(best_state)
    result.wall_s = time.perf_counter() - start
    return result


class StabilityTracker:
    """Per-epoch SK drift of a net on a fixed probe set (Hypothesis 1)."""

    def __init__(self, net: ReLUNet, probe_x: torch.Tensor) -> None:
        self.net = net
        self.probe_x = probe_x
        self.prev_structure = self._structure()
        self.prev_params = net.param_vector()

    def _structure(self) -> PackedStructure:
        return PathSelector(self.net).packed_structure(self.probe_x)

    def step(self) -> dict[str, float]:
        current, params = self._structure(), self.net.param_vector()
        metrics = {
            "gate_flip": gate_flip_fraction(self.prev_structure, current),
            "pool_flip": pool_flip_fraction(self.prev_structure, current),
            "weight_rel_change": float((params - self.prev_params).norm()
                                       / self.prev_params.norm().clamp_min(1e-12)),
        }
        self.prev_structure, self.prev_params = current, params
        return metrics


def train_full(net: ReLUNet, train: Split, val: Split, cfg: TrainConfig,
               on_epoch: EpochCallback | None = None, should_cancel: CancelCheck | None = None,
               track_stability: bool = True) -> TrainResult:
    """Train every weight (SK and QK move together): the paper's step 1 and full retrain."""
    device = pick_device(cfg.device)
    net.to(device)
    train, val = train.to(device), val.to(device)
    tracker = StabilityTracker(net, val.x[:cfg.probe_size]) if track_stability else None

    def forward(x: torch.Tensor, _rows: torch.Tensor) -> torch.Tensor:
        return net(x)

    return _run_epochs(net, list(net.parameters()), forward, forward, train, val, cfg,
                       on_epoch, should_cancel, tracker.step if tracker else None)


def train_qk_adam(model: DecoupledModel, train: Split, val: Split, cfg: TrainConfig,
                  on_epoch: EpochCallback | None = None,
                  should_cancel: CancelCheck | None = None) -> TrainResult:
    """QK-only training: the estimator learns under the frozen selector's cached structure.

    The structure of the training and validation sets is computed once (paper step 3) and
    kept bit-packed on the device; each mini-batch unpacks its rows (step 4).
    """
    device = pick_device(cfg.device)
    model.to(device)
    train, val = train.to(device), val.to(device)
    t0 = time.perf_counter()
    train_cache = model.selector.packed_structure(train.x)
    val_cache = model.selector.packed_structure(val.x)
    structure_s = time.perf_counter() - t0
    estimator = model.estimator

    def train_fwd(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return estimator(x, train_cache.index(rows))

    def val_fwd(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return estimator(x, val_cache.index(rows))

    result = _run_epochs(estimator, list(estimator.parameters()), train_fwd, val_fwd, train, val,
                         cfg, on_epoch, should_cancel)
    result.structure_s = structure_s
    result.wall_s += structure_s
    return result


def train_qk(model: DecoupledModel, train: Split, val: Split, cfg: TrainConfig,
             on_epoch: EpochCallback | None = None,
             should_cancel: CancelCheck | None = None) -> TrainResult:
    """The default QK-only retrain used by the retrain job."""
    return train_qk_adam(model, train, val, cfg, on_epoch, should_cancel)


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
