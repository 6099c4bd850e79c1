"""Full training from mini-batches that arrive as a stream (an ``IterableDataset``).

:func:`app.core.training.train_full` shuffles an in-memory tensor; this is the same epoch
driver (Adam, early stopping on the validation loss with the best weights restored, a cancel
check between epochs, per-epoch metrics) for data that are read batch by batch, e.g. from the
store (:class:`app.retrain.streamed_data.StoreBatches`). The validation metrics come from a
callable that may stream too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

from app.core.device import pick_device
from app.core.network import ReLUNet
from app.core.tasks import check_task, loss_fn
from app.core.training import EarlyStopping, EpochCallback, TrainConfig, TrainingCancelled, TrainResult


class EpochBatches(Protocol, Iterable[tuple[torch.Tensor, torch.Tensor]]):
    def set_epoch(self, epoch: int) -> None: ...


def train_full_streamed(net: ReLUNet, batches: EpochBatches, val_eval: Callable[[], dict[str, float]],
                        cfg: TrainConfig, on_epoch: EpochCallback | None = None,
                        should_cancel: Callable[[], bool] | None = None) -> TrainResult:
    """Train every weight of ``net`` on ``batches``; ``val_eval()`` → validation metrics."""
    device = pick_device(cfg.device)
    net.to(device)
    loss = loss_fn(check_task(cfg.task), net.to_layer_space)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = TrainResult(solver="full")
    started = time.perf_counter()
    stopping = EarlyStopping(net, result, cfg.patience)
    for epoch in range(1, cfg.epochs + 1):
        if should_cancel is not None and should_cancel():
            raise TrainingCancelled(f"cancelled before epoch {epoch}")
        t0 = time.perf_counter()
        batches.set_epoch(epoch)
        net.train()
        loss_sum, rows = 0.0, 0
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            batch_loss = loss(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            loss_sum += float(batch_loss.detach()) * x.shape[0]
            rows += x.shape[0]
        net.eval()
        val = val_eval()
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(rows, 1),
                                   **{f"val_{k}": v for k, v in val.items()},
                                   "seconds": time.perf_counter() - t0}
        if stopping.end_epoch(epoch, val, metrics, on_epoch):
            break
    stopping.restore_best()
    result.wall_s = time.perf_counter() - started
    return result
