""":func:`app.core.tasks.evaluate_task`'s metrics, accumulated over chunks of outputs.

A holdout of millions of rows is evaluated chunk by chunk; only sums are kept (classification:
summed cross-entropy and hits; regression: per-output sums of errors, squared errors and
targets, so R² = 1 − SSE/SST comes out without a second pass).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from app.core.tasks import check_task


class StreamMetrics:
    def __init__(self, task: str, to_layer: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.task = check_task(task)
        self.to_layer = to_layer
        self.n = 0
        self.loss_sum = 0.0
        self.correct = 0
        self._sums: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """One chunk: model outputs (target units) and labels/targets."""
        rows = int(y.shape[0])
        if rows == 0:
            return
        self.n += rows
        if self.task == "classification":
            self.loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            self.correct += int((out.argmax(1) == y).sum())
            return
        pred, target = out.reshape(rows, -1).double(), y.reshape(rows, -1).double()
        err = pred - target
        layer = ((self.to_layer(pred) - self.to_layer(target)) if self.to_layer is not None else err)
        parts = {"sse": (err ** 2).sum(0), "sae": err.abs().sum(0), "st": target.sum(0),
                 "stt": (target ** 2).sum(0), "layer_sse": (layer ** 2).sum(0)}
        for name, value in parts.items():
            self._sums[name] = value if name not in self._sums else self._sums[name] + value

    def result(self) -> dict[str, float]:
        n = self.n
        if self.task == "classification":
            return {"loss": self.loss_sum / max(n, 1), "acc": self.correct / max(n, 1)}
        if n == 0:
            nan = float("nan")
            return {"mse": nan, "rmse": nan, "mae": nan, "r2": nan, "loss": nan}
        s = self._sums
        mse_k = s["sse"] / n
        sst_k = (s["stt"] / n - (s["st"] / n) ** 2).clamp_min(0.0)
        r2_k = 1.0 - mse_k / sst_k.clamp_min(1e-300)
        k = mse_k.numel()
        return {"mse": float(mse_k.mean()), "rmse": float(mse_k.sqrt().mean()),
                "mae": float(s["sae"].sum() / (n * k)), "r2": float(r2_k.mean()),
                "loss": float(s["layer_sse"].sum() / (n * k))}
