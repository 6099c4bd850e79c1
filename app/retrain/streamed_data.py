"""Retrain data straight from the store: ids, sampled rows, holdout passes, full-retrain batches.

Everything here reads the store in keyset-paginated chunks (:func:`iter_window`), so memory
is one chunk whatever the number of stored samples:

- :func:`window_ids`: the ids of the window (8 bytes per sample: split sizes, drift sampling);
- :func:`fetch_rows`: the features of given ids, in the given order (drift's sampled rows);
- :func:`evaluate_streamed`: holdout metrics of several models in one pass;
- :class:`StoreBatches`: an ``IterableDataset`` of one role's mini-batches for a full retrain
  whose data do not fit the memory budget: each epoch visits the id blocks in a seeded random
  order and shuffles the rows within each block;
- :func:`load_role`: one role's rows in memory (a full retrain whose data fit the budget
  trains exactly as before).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from app.core.data import Split
from app.core.stream_metrics import StreamMetrics
from app.retrain.sample_stream import DataWindow, iter_window
from app.storage import Store


def window_ids(store: Store, window: DataWindow, chunk_rows: int) -> np.ndarray:
    parts = [chunk.ids for chunk in iter_window(store, window, chunk_rows)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def fetch_rows(store: Store, window: DataWindow, ids: np.ndarray) -> torch.Tensor:
    """float32 [len(ids), D]: the features of ``ids`` (any order, repeats allowed)."""
    rows = store.load_samples_by_ids(window.n_features, ids, window.n_targets)
    where = np.searchsorted(rows.ids, ids)
    if len(ids) and (where.max() >= len(rows.ids) or not np.array_equal(rows.ids[where], ids)):
        raise RuntimeError("samples vanished from the store while the retrain read them")
    return torch.from_numpy(np.ascontiguousarray(rows.x[where]))


def load_role(store: Store, window: DataWindow, role: int, chunk_rows: int) -> Split:
    xs, ys = [], []
    for chunk in iter_window(store, window, chunk_rows):
        rows = window.roles(chunk.ids) == role
        xs.append(chunk.x[rows])
        ys.append(chunk.y[rows])
    x = np.concatenate(xs) if xs else np.zeros((0, window.n_features), np.float32)
    y = (np.concatenate(ys) if ys else
         np.zeros(0, np.int64) if window.n_targets is None else np.zeros((0, window.n_targets), np.float32))
    return Split(torch.from_numpy(x), torch.from_numpy(y))


Evaluated = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def evaluate_streamed(store: Store, window: DataWindow, role: int, models: Sequence[Evaluated],
                      task: str, chunk_rows: int, device: torch.device,
                      batch: int = 4096) -> list[dict[str, float]]:
    """``evaluate_task`` metrics of each ``(forward, to_layer_space)`` on one role's rows, in one
    pass over the store (modules already on ``device``, in eval mode)."""
    meters = [StreamMetrics(task, to_layer) for _forward, to_layer in models]
    with torch.no_grad():
        for chunk in iter_window(store, window, chunk_rows):
            rows = window.roles(chunk.ids) == role
            if not rows.any():
                continue
            x, y = torch.from_numpy(chunk.x[rows]).to(device), torch.from_numpy(chunk.y[rows]).to(device)
            for i in range(0, x.shape[0], batch):
                for (forward, _to_layer), meter in zip(models, meters, strict=True):
                    meter.add(forward(x[i:i + batch]), y[i:i + batch])
    return [meter.result() for meter in meters]


class StoreBatches(torch.utils.data.IterableDataset):
    """Shuffled mini-batches ``(x, y)`` of one role's rows, streamed from the store."""

    def __init__(self, store: Store, window: DataWindow, role: int, block_ids: int, batch_size: int,
                 seed: int) -> None:
        super().__init__()
        self.store, self.window, self.role = store, window, role
        self.block_ids, self.batch_size, self.seed = block_ids, batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = np.random.default_rng([self.seed, self.epoch])
        w, b = self.window, self.block_ids
        if w.max_id <= w.min_id:
            return
        blocks = np.arange(w.min_id // b, (w.max_id - 1) // b + 1)
        for index in gen.permutation(blocks):
            lo, hi = int(index) * b, (int(index) + 1) * b
            for chunk in iter_window(self.store, w, b, after_id=lo, max_id=hi):
                rows = np.flatnonzero(w.roles(chunk.ids) == self.role)
                rows = rows[gen.permutation(len(rows))]
                x, y = torch.from_numpy(chunk.x), torch.from_numpy(chunk.y)
                for i in range(0, len(rows), self.batch_size):
                    take = torch.from_numpy(rows[i:i + self.batch_size])
                    yield x[take], y[take]

