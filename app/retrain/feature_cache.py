"""Per-selector-version cache of every sample's gated penultimate features Φ.

While the selector and the estimator's hidden layers stay as they are (every readout-only QK
retrain), a sample's Φ never changes, so a QK retrain computes it once and keeps it here.

- **Key** (:func:`feature_key`): sha256 of the architecture, every selector tensor and every
  estimator tensor below the readout. A full retrain, an import, or activating a version with
  other hidden weights gives another key, hence another directory: invalidation is exact and
  needs no bookkeeping; a version activated again finds its own features if still kept.
- **Blocks**: the id space is cut into blocks of ``block_ids`` ids (``(k·B, (k+1)·B]``); block
  k is a directory ``{k:09d}/`` of ``.npy`` files (``ids`` int64, ``phi`` float32 [n, d],
  ``y``) holding every usable row of that id range (the store's filters, no retention cut:
  the window is applied when reading), grouped by role (train, validation, holdout) so that a
  pass over one role memory-maps and reads only that role's bytes, and ``meta.json``:
  ``offsets`` of the roles, ``built_upto`` (the watermark it was built
  at: a block that was partial is rebuilt once more ids exist), ``audit_mark`` (the newest
  ``sample_audit`` id then: after a quarantine, release or delete the block's ids are
  compared with the store's and the block rebuilt if they differ). Φ is float32, exactly what
  the network computed: a block is always computed from the same rows in the same order, so
  a cache hit gives bit-identical features, and the refit the same readout, as recomputing.
- **Files, not SQL**: Φ is 1 KiB per sample for a 256-wide layer, 4× the sample itself; in
  the store it would bloat every backup and travel through the database on every refit pass.
  Files are read at disk speed (and the page cache's), are derived data (deleting them costs
  one recomputation), and each block is written to a temporary directory and renamed, so
  concurrent writers (sharded feature passes) and readers never see a torn block. Workers on other
  machines use a cache of their own, or share one on a common volume
  (``SKQK_FEATURE_CACHE_DIR``) — the sharded pass needs that.
- ``SKQK_FEATURE_CACHE_KEEP`` key directories are kept, the least recently used go first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.network import DecoupledModel


def _hash_tensors(h: Any, state: dict[str, torch.Tensor]) -> None:
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        h.update(tensor.numpy().tobytes())


def feature_key(model: DecoupledModel) -> str:
    """What Φ depends on: the architecture, the selector, the estimator below its readout."""
    net = model.estimator.net
    readout = f"blocks.{len(net.spec.layers) - 1}."
    h = hashlib.sha256(json.dumps(model.spec.to_dict(), sort_keys=True).encode())
    _hash_tensors(h, {f"selector.{k}": v for k, v in model.selector.net.state_dict().items()})
    _hash_tensors(h, {f"estimator.{k}": v for k, v in net.state_dict().items()
                      if not k.startswith(readout)})
    return h.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


ROLES = 3  # train, validation, holdout (app.retrain.sample_stream): rows are stored in that order


@dataclass
class CachedBlock:
    """One block's rows grouped by role (id order within a role); ``offsets[r]:offsets[r+1]``
    are role r's rows. Arrays may be memory maps: slicing one role reads only its bytes."""

    index: int
    ids: np.ndarray  # int64 [n]
    phi: np.ndarray  # float32 [n, d]
    y: np.ndarray  # int64 [n] or float32 [n, T]
    offsets: tuple[int, ...]  # ROLES + 1 row offsets

    def role(self, r: int) -> slice:
        return slice(self.offsets[r], self.offsets[r + 1])


def group_by_role(index: int, ids: np.ndarray, phi: np.ndarray, y: np.ndarray,
                  roles: np.ndarray) -> CachedBlock:
    order = np.argsort(roles, kind="stable")  # stable: id order within each role
    counts = np.bincount(roles, minlength=ROLES)
    offsets = (0, *np.cumsum(counts).tolist())
    return CachedBlock(index, ids[order], phi[order], y[order], tuple(int(o) for o in offsets))


class FeatureCache:
    def __init__(self, root: Path, key: str, block_ids: int, modulo: int) -> None:
        self.root, self.key, self.block_ids = Path(root), key, block_ids
        # the role grouping follows holdout_modulo: another modulo is another cache
        self.dir = self.root / f"{key[:40]}-b{block_ids}-m{modulo}"

    def open(self, keep: int) -> FeatureCache:
        """Create (or touch, for least-recently-used pruning) this key's directory; prune others."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.utime(self.dir)
        others = sorted((p for p in self.root.iterdir() if p.is_dir() and p != self.dir),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in others[max(keep - 1, 0):]:
            shutil.rmtree(stale, ignore_errors=True)
        return self

    def bounds(self, index: int) -> tuple[int, int]:
        """Ids (lo, hi] of block ``index``."""
        return index * self.block_ids, (index + 1) * self.block_ids

    def _block_dir(self, index: int) -> Path:
        return self.dir / f"{index:09d}"

    def meta(self, index: int) -> dict[str, Any] | None:
        try:
            return json.loads((self._block_dir(index) / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def set_meta(self, index: int, meta: dict[str, Any]) -> None:
        _atomic_write(self._block_dir(index) / "meta.json", lambda f: f.write(json.dumps(meta).encode()))

    def load(self, index: int, meta: dict[str, Any] | None = None) -> CachedBlock:
        """The block as memory maps (nothing is read until sliced)."""
        meta = meta or self.meta(index)
        if meta is None:
            raise FileNotFoundError(f"feature cache block {index} is missing")
        d = self._block_dir(index)
        return CachedBlock(index, np.load(d / "ids.npy", mmap_mode="r"),
                           np.load(d / "phi.npy", mmap_mode="r"), np.load(d / "y.npy", mmap_mode="r"),
                           tuple(meta["offsets"]))

    def valid(self, index: int, needed_upto: int, audit_mark: int) -> bool:
        """Block ``index`` holds every row up to ``needed_upto`` as of ``audit_mark``."""
        meta = self.meta(index)
        return meta is not None and meta["built_upto"] >= needed_upto and meta["audit_mark"] == audit_mark

    @contextlib.contextmanager
    def claim(self, index: int, wait: bool = True) -> Iterator[bool]:
        """An exclusive lock on block ``index`` across processes (``flock`` on a lock file, on
        the cache's file system): whoever computes a block holds it, so sharded workers never
        compute a block twice at once. Yields False if ``wait`` is False and another holds it."""
        with open(self.dir / f".{index:09d}.lock", "a+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def save(self, block: CachedBlock, built_upto: int, audit_mark: int, worker: str | None = None) -> None:
        """Written into a fresh directory, renamed into place: readers see the old or the new block.
        Callers hold :meth:`claim`; a valid block is never replaced while a job may read it."""
        final = self._block_dir(block.index)
        tmp = self.dir / f".{block.index:09d}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        tmp.mkdir()
        try:
            for name, array in (("ids", block.ids), ("phi", block.phi), ("y", block.y)):
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
            (tmp / "meta.json").write_text(json.dumps({
                "built_upto": built_upto, "audit_mark": audit_mark, "rows": int(block.ids.shape[0]),
                "offsets": list(block.offsets), "worker": worker or f"{socket.gethostname()}/{os.getpid()}"}))
            if final.exists():  # replace: move the old one aside first (rename is atomic)
                trash = self.dir / f".{block.index:09d}.{os.getpid()}.{time.monotonic_ns()}.old"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
