"""What "loss" and "how good" mean per task: classification (cross-entropy, accuracy) or
regression (mean squared error, RMSE/MAE/R²).

Regression losses are taken in the last layer's units (targets standardised by the spec's
``output_affine``), so every output counts alike and learning rates mean the same as for
classification; reported metrics (RMSE, MAE, R²) are in the targets' own units.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

TASKS = ("classification", "regression")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, row indices) → outputs


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def loss_fn(task: str, to_layer: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LossFn:
    """Training loss on model outputs; ``to_layer`` maps output units to layer units."""
    if check_task(task) == "classification":
        return F.cross_entropy

    def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out, y = out.reshape(y.shape[0], -1), y.reshape(y.shape[0], -1)
        if to_layer is not None:
            out, y = to_layer(out), to_layer(y)
        return F.mse_loss(out, y)

    return mse


@torch.no_grad()
def evaluate_task(forward: ForwardFn, x: torch.Tensor, y: torch.Tensor, task: str,
                  to_layer: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  batch_size: int = 4096) -> dict[str, float]:
    """Metrics of ``forward`` on (x, y).

    classification: ``loss`` (mean cross-entropy), ``acc``;
    regression: ``loss`` (MSE in layer units), ``mse``, ``rmse``, ``mae``, ``r2`` (target units,
    averaged over outputs; R² = 1 − SSE/SST per output).
    """
    n = int(y.shape[0])
    if check_task(task) == "classification":
        total, correct = 0.0, 0
        for start in range(0, n, batch_size):
            rows = torch.arange(start, min(start + batch_size, n), device=x.device)
            logits = forward(x[rows], rows)
            total += float(F.cross_entropy(logits, y[rows], reduction="sum"))
            correct += int((logits.argmax(1) == y[rows]).sum())
        return {"loss": total / max(n, 1), "acc": correct / max(n, 1)}
    preds = []
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(start + batch_size, n), device=x.device)
        preds.append(forward(x[rows], rows).reshape(rows.numel(), -1))
    pred = torch.cat(preds).double() if preds else torch.zeros(0, 1, dtype=torch.float64)
    target = y.reshape(n, -1).double()
    metrics = regression_metrics(pred, target)
    layer_pred, layer_y = (to_layer(pred), to_layer(target)) if to_layer is not None else (pred, target)
    metrics["loss"] = float(((layer_pred - layer_y) ** 2).mean()) if n else float("nan")
    return metrics


def regression_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    if target.shape[0] == 0:
        nan = float("nan")
        return {"mse": nan, "rmse": nan, "mae": nan, "r2": nan}
    err = pred - target
    mse_k = (err ** 2).mean(0)
    sst_k = ((target - target.mean(0)) ** 2).mean(0)
    r2_k = 1.0 - mse_k / sst_k.clamp_min(1e-300)
    return {"mse": float(mse_k.mean()), "rmse": float(mse_k.sqrt().mean()),
            "mae": float(err.abs().mean()), "r2": float(r2_k.mean())}


def holdout_metrics(metrics: dict[str, float], task: str) -> dict[str, float]:
    """``evaluate_task`` output → the names versions and jobs report (``holdout_*``)."""
    if task == "classification":
        return {"holdout_acc": metrics["acc"], "holdout_loss": metrics["loss"]}
    return {"holdout_rmse": metrics["rmse"], "holdout_mae": metrics["mae"], "holdout_r2": metrics["r2"],
            "holdout_loss": metrics["mse"]}
