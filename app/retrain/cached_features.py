"""A QK retrain's view of the data: cached features Φ, brought up to date, read block by block.

:meth:`CachedFeatures.prepare` makes the feature cache (:mod:`app.retrain.feature_cache`) of
the champion's key cover every block up to the job's watermark, running the network only on
blocks that are missing, were partial (the block of the last watermark: new rows arrived),
or whose rows changed (a quarantine, release or delete since the block was written); every
other block is read back as it is. A QK retrain therefore runs the network on the samples
added since the last retrain (plus at most one block), not on every stored sample.

The job then reads the blocks (filtered by its :class:`~app.retrain.sample_stream.DataWindow`)
for everything else it needs: the ids (split sizes, drift sampling), training and validation
chunks for the readout refit, holdout chunks for evaluating candidate and champion. Blocks are
kept in memory while they fit the memory budget, else re-read from disk on each pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.network import DecoupledModel
from app.core.qk_fast import readout_features
from app.core.qk_stream import Chunk, ChunkSource
from app.retrain.feature_cache import CachedBlock, FeatureCache, feature_key, group_by_role
from app.retrain.sample_stream import DataWindow
from app.storage import Store

log = logging.getLogger("skqk.retrain")

RowsHook = Callable[[int, int], None]  # (rows computed so far, rows to compute)
CancelHook = Callable[[], None]  # raises to stop


@dataclass
class SyncStats:
    blocks_reused: int = 0
    blocks_computed: int = 0
    rows_computed: int = 0
    seconds: float = 0.0
    workers: list[str] = field(default_factory=list)  # hosts that computed the blocks


# (store, cache, model, window, stale block indices, audit mark, cancel check): computes blocks
FeaturePass = Callable[[Store, FeatureCache, DecoupledModel, DataWindow, list[int], int, CancelHook], None]


@dataclass
class WindowBlock:
    """A cached block restricted to the job's window, with each row's role."""

    ids: np.ndarray
    phi: np.ndarray
    y: np.ndarray
    roles: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.phi.nbytes + self.y.nbytes + self.roles.nbytes)


def ensure_block(store: Store, cache: FeatureCache, model: DecoupledModel, window: DataWindow,
                 index: int, audit_mark: int, wait: bool = True) -> bool | None:
    """Make block ``index`` valid for the window: True computed here, False found valid (another
    process computed it), None: another process holds it right now (only when not ``wait``)."""
    upto = min(cache.bounds(index)[1], window.max_id)
    with cache.claim(index, wait) as mine:
        if not mine:
            return None
        if cache.valid(index, upto, audit_mark):
            return False
        compute_block(store, cache, model, window, index, audit_mark)
        return True


def compute_block(store: Store, cache: FeatureCache, model: DecoupledModel, window: DataWindow,
                  index: int, audit_mark: int, chunk: int = 4096) -> int:
    """Run the network on block ``index``'s usable rows up to the watermark and store Φ; its rows."""
    lo, hi = cache.bounds(index)
    upto = min(hi, window.max_id)
    parts = list(store.iter_samples(window.n_features, after_id=lo, max_id=upto,
                                    n_targets=window.n_targets, chunk_rows=cache.block_ids))
    d = model.estimator.net.readout.in_features
    if parts:
        ids = np.concatenate([p.ids for p in parts])
        x = np.concatenate([p.x for p in parts])
        y = np.concatenate([p.y for p in parts])
        model.eval()
        with torch.no_grad():
            phi = readout_features(model, torch.from_numpy(x), chunk).cpu().numpy()
    else:
        ids, phi = np.zeros(0, np.int64), np.zeros((0, d), np.float32)
        y = np.zeros(0, np.int64) if window.n_targets is None else np.zeros((0, window.n_targets), np.float32)
    cache.save(group_by_role(index, ids, phi, y, window.roles(ids)), upto, audit_mark)
    return len(ids)


def stale_blocks(store: Store, cache: FeatureCache, window: DataWindow, audit_mark: int) -> list[int]:
    """Blocks of the window that must be (re)computed; blocks that only need their audit mark
    moved on (their rows are unchanged) get it here."""
    todo = []
    for index in window_blocks(window, cache.block_ids):
        meta = cache.meta(index)
        lo, hi = cache.bounds(index)
        if meta is None or meta["built_upto"] < min(hi, window.max_id):
            todo.append(index)
            continue
        if meta["audit_mark"] == audit_mark:
            continue
        now = store.usable_ids_between(window.n_features, lo, meta["built_upto"], window.n_targets)
        if np.array_equal(now, np.sort(np.asarray(cache.load(index, meta).ids))):
            cache.set_meta(index, {**meta, "audit_mark": audit_mark})
        else:
            todo.append(index)
    return todo


def window_blocks(window: DataWindow, block_ids: int) -> list[int]:
    if window.max_id <= window.min_id:
        return []
    return list(range(window.min_id // block_ids, (window.max_id - 1) // block_ids + 1))


Weights = Callable[[np.ndarray], np.ndarray]  # ids → per-row weight (0: left out)


class CachedFeatures:
    def __init__(self, cache: FeatureCache, window: DataWindow, budget_bytes: int, stats: SyncStats) -> None:
        self.cache, self.window, self.budget_bytes, self.stats = cache, window, budget_bytes, stats
        self.key = cache.key
        self.indices = window_blocks(window, cache.block_ids)
        self._metas: dict[int, dict[str, Any]] = {}
        self.streamed = False  # did the last refit source stream from disk?

    @classmethod
    def prepare(cls, store: Store, model: DecoupledModel, window: DataWindow, root: Path, block_ids: int,
                keep: int, budget_bytes: int, on_rows: RowsHook | None = None,
                check_cancel: CancelHook | None = None,
                feature_pass: FeaturePass | None = None) -> CachedFeatures:
        started = time.perf_counter()
        cache = FeatureCache(root, feature_key(model), block_ids, window.modulo).open(keep)
        audit_mark = store.sample_audit_mark()
        todo = stale_blocks(store, cache, window, audit_mark)
        stats = SyncStats(blocks_reused=len(window_blocks(window, block_ids)) - len(todo))
        # at most this many rows are computed (a block holds at most block_ids ids)
        estimate = sum(min(cache.bounds(i)[1], window.max_id) - cache.bounds(i)[0] for i in todo)
        if feature_pass is not None and todo:  # e.g. sharded across Celery workers
            feature_pass(store, cache, model, window, todo, audit_mark, check_cancel or (lambda: None))
        for index in todo:  # whatever is still missing (all of it without a feature_pass)
            if check_cancel is not None:
                check_cancel()
            ensure_block(store, cache, model, window, index, audit_mark)
            stats.rows_computed += int((cache.meta(index) or {}).get("rows", 0))
            stats.blocks_computed += 1
            if on_rows is not None:
                on_rows(stats.rows_computed, max(estimate, stats.rows_computed))
        stats.workers = sorted({str((cache.meta(i) or {}).get("worker")) for i in todo})
        stats.seconds = time.perf_counter() - started
        log.info("feature cache %s: %d blocks reused, %d computed (%d rows) in %.2fs", cache.dir.name,
                 stats.blocks_reused, stats.blocks_computed, stats.rows_computed, stats.seconds)
        return cls(cache, window, budget_bytes, stats)

    # ---- reading -----------------------------------------------------------------------------
    def _block(self, index: int) -> CachedBlock:
        if index not in self._metas:
            meta = self.cache.meta(index)
            if meta is None:
                raise FileNotFoundError(f"feature cache block {index} vanished during the retrain")
            self._metas[index] = meta
        return self.cache.load(index, self._metas[index])

    def ids(self) -> np.ndarray:
        """The window's ids, ascending (reads ids and labels only)."""
        parts = []
        for index in self.indices:
            block = self._block(index)
            ids, y = np.asarray(block.ids), np.asarray(block.y)
            parts.append(ids[self.window.keep_arrays(ids, y)])
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def role_rows(self, role: int) -> int:
        """An upper bound of one role's rows (before the window's filters)."""
        total = 0
        for index in self.indices:
            offsets = self._block(index).offsets
            total += offsets[role + 1] - offsets[role]
        return total

    def _role_chunks(self, role: int, weights: Weights | None, finite_only: bool
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """(phi, y, weight) of one role's rows per block; only the selected rows are read."""
        for index in self.indices:
            block = self._block(index)
            part = block.role(role)
            ids, y = np.asarray(block.ids[part]), np.asarray(block.y[part])
            keep = self.window.keep_arrays(ids, y)
            w = None
            if weights is not None:
                w = weights(ids)
                keep &= w > 0
            rows = np.flatnonzero(keep)
            if len(rows) == 0:
                continue
            if len(rows) == len(ids):
                phi, y = np.array(block.phi[part]), np.array(y)  # one contiguous read each
            else:
                phi = block.phi[part.start + rows]  # fancy indexing reads (and copies) only these
                y, w = y[rows], (w[rows] if w is not None else None)
            if finite_only:  # overflowed rows cannot inform a convex refit
                finite = np.isfinite(phi).all(axis=1)
                if not finite.all():
                    phi, y, w = phi[finite], y[finite], (w[finite] if w is not None else None)
            if len(phi):
                yield phi, y, w

    def source(self, role: int, y_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
               weights: Weights | None = None, keep_fraction: float = 1.0) -> ChunkSource:
        """Chunks (phi, y, weight) of one role's rows with finite features (refit input): held in
        memory when they fit a quarter of the budget, else read from the cache on every pass."""

        def stream() -> Iterator[Chunk]:
            for phi, y, w in self._role_chunks(role, weights, finite_only=True):
                yt = torch.from_numpy(np.ascontiguousarray(y))
                yield (torch.from_numpy(phi), y_map(yt) if y_map is not None else yt,
                       torch.from_numpy(w) if w is not None else None)

        d = self.cache_dim()
        if self.role_rows(role) * keep_fraction * (4 * d + 16) > self.budget_bytes // 4:
            self.streamed = True
            return stream
        held = list(stream())
        return lambda: iter(held)

    def cache_dim(self) -> int:
        for index in self.indices:
            return int(self._block(index).phi.shape[1])
        return 0

    def role_chunks(self, role: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(phi, y) of one role's rows, every row (evaluation: non-finite rows count too)."""
        for phi, y, _w in self._role_chunks(role, None, finite_only=False):
            yield torch.from_numpy(phi), torch.from_numpy(np.ascontiguousarray(y))
