"""The holdout of one retrain job, fixed when the job fixes its ids.

The promotion gate must compare candidate and champion on the rows the job chose at its start.
Reading the holdout from the store again at the end lets a delete or quarantine issued
meanwhile empty it, and an empty holdout scores 0.0 for both, which passes the gate. So:

- a full retrain copies its holdout rows (features and labels) into the job's temporary
  directory during the pass that fixes the ids (:func:`window_ids_with_holdout`) and scores
  both models on that copy (:meth:`HoldoutRows.evaluate`); nothing done to the store later
  changes it;
- whatever the path, :func:`check_evaluated` refuses to go on when the number of rows
  evaluated differs from the number fixed at the start: ``n_holdout`` is then exactly the
  number of rows both models were scored on, and the gate never runs on a holdout it did
  not evaluate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from app.core.stream_metrics import StreamMetrics
from app.retrain.sample_stream import HOLDOUT, DataWindow, iter_window
from app.storage import Store

Evaluated = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


class HoldoutChanged(RuntimeError):
    """The holdout evaluated is not the one fixed at job start; the job fails, nothing promoted."""


class HoldoutRows:
    """Append-only copy of the holdout rows on disk (x float32 [n, D], y int64 or float32 [n, T])."""

    def __init__(self, root: Path, window: DataWindow) -> None:
        self.window = window
        self._x_path, self._y_path = root / "holdout_x.f32", root / "holdout_y.bin"
        self._x, self._y = self._x_path.open("wb"), self._y_path.open("wb")
        self.count = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self._x.write(np.ascontiguousarray(x, dtype=np.float32).tobytes())
        dtype = np.int64 if self.window.n_targets is None else np.float32
        self._y.write(np.ascontiguousarray(y, dtype=dtype).tobytes())
        self.count += len(x)

    def close(self) -> None:
        self._x.close()
        self._y.close()

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self.close()
        if self.count == 0:
            return
        w = self.window
        x = np.memmap(self._x_path, dtype=np.float32, mode="r", shape=(self.count, w.n_features))
        y_shape = (self.count,) if w.n_targets is None else (self.count, w.n_targets)
        y = np.memmap(self._y_path, dtype=np.int64 if w.n_targets is None else np.float32, mode="r",
                      shape=y_shape)
        for i in range(0, self.count, rows):
            yield np.array(x[i:i + rows]), np.array(y[i:i + rows])

    def evaluate(self, models: Sequence[Evaluated], task: str, device: torch.device,
                 batch: int = 4096) -> tuple[list[dict[str, float]], int]:
        """Metrics of each ``(forward, to_layer_space)`` on the copied rows, and the row count."""
        meters = [StreamMetrics(task, to_layer) for _forward, to_layer in models]
        with torch.no_grad():
            for x, y in self.chunks(batch):
                xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
                for (forward, _to_layer), meter in zip(models, meters, strict=True):
                    meter.add(forward(xt), yt)
        return [m.result() for m in meters], (meters[0].n if meters else 0)


def window_ids_with_holdout(store: Store, window: DataWindow, chunk_rows: int,
                            holdout: HoldoutRows) -> np.ndarray:
    """The window's ids (like ``window_ids``), copying the holdout rows into ``holdout`` on the way."""
    parts = []
    for chunk in iter_window(store, window, chunk_rows):
        parts.append(chunk.ids)
        rows = window.roles(chunk.ids) == HOLDOUT
        if rows.any():
            holdout.add(chunk.x[rows], chunk.y[rows])
    holdout.close()
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def check_evaluated(evaluated: int, fixed: int) -> None:
    """Refuse a gate on anything but the holdout fixed at job start."""
    if evaluated != fixed:
        raise HoldoutChanged(
            f"the holdout fixed at job start has {fixed} rows but {evaluated} could be evaluated (rows "
            "deleted or quarantined while the job ran); not promoting on a holdout it did not evaluate: "
            "retrain again")
