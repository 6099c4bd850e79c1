"""The model holder: which version this process serves, and hot-swapping it.

Loading a version = read its row, verify both sha256s, rebuild the nets, move them to the
device and warm them up; only then is the reference swapped (one attribute assignment, so
a reader sees either the old or the new :class:`LoadedModel`, never a mixture). Batches take
the reference once when they start, so a batch never mixes versions and in-flight work
finishes on the version it started with. A version that fails to load leaves the old one
serving and is not retried for ``retry_failed_after_s``.

``refresh()`` is the one entry point for "the active version may have changed": the
periodic poll, the embedded retrain runner after a promotion, and ``activate`` call it;
a Redis subscriber (distributed mode) only needs to call it too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from app.core.device import pick_device
from app.core.network import DecoupledModel
from app.core.spec import ArchSpec
from app.serving.metrics import ServingMetrics
from app.serving.models import load_model
from app.storage import Store, UnknownVersion, VersionRecord

log = logging.getLogger("skqk.holder")


@dataclass(eq=False)
class LoadedModel:
    """One immutable, warmed-up version, ready for inference."""

    version: int
    model: DecoupledModel
    record: VersionRecord
    device: torch.device
    loaded_at: float = field(default_factory=time.time)

    @property
    def spec(self) -> ArchSpec:
        return self.model.spec

    @property
    def input_dim(self) -> int:
        return self.spec.input_dim

    @property
    def num_outputs(self) -> int:
        return self.spec.num_outputs

    def infer(self, x: np.ndarray) -> np.ndarray:
        """float32 [N, D] → logits float32 [N, C] (CPU numpy)."""
        with torch.inference_mode():
            out = self.model(torch.from_numpy(x).to(self.device, non_blocking=True))
            return out.float().cpu().numpy()


class ModelHolder:
    def __init__(self, store: Store, device: str | None = "auto", metrics: ServingMetrics | None = None,
                 warmup_batch_sizes: tuple[int, ...] = (1, 64), version_cache_size: int = 2,
                 retry_failed_after_s: float = 30.0) -> None:
        self.store = store
        self.device = pick_device(device)
        self.metrics = metrics
        self.warmup_batch_sizes = warmup_batch_sizes
        self.version_cache_size = version_cache_size
        self.retry_failed_after_s = retry_failed_after_s
        self._current: LoadedModel | None = None
        self._cache: OrderedDict[int, LoadedModel] = OrderedDict()  # recently served versions
        self._failed: dict[int, float] = {}
        self._lock = threading.RLock()  # one load/swap at a time

    # ---- reading --------------------------------------------------------------------------
    @property
    def current(self) -> LoadedModel | None:
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    # ---- loading ----------------------------------------------------------------------------
    def load(self, version: int) -> LoadedModel:
        """Load, verify and warm up a version (raises UnknownVersion, ChecksumMismatch, …)."""
        model, record = load_model(self.store, version)
        record.selector_weights = record.estimator_weights = None  # keep the summary only
        model = model.to(self.device).eval()
        loaded = LoadedModel(version, model, record, self.device)
        for n in self.warmup_batch_sizes:
            out = loaded.infer(np.zeros((n, loaded.input_dim), dtype=np.float32))
            if out.shape != (n, loaded.num_outputs) or not np.isfinite(out).all():
                raise RuntimeError(f"version {version} failed its warm-up (output {out.shape})")
        return loaded

    def _cached_or_load(self, version: int) -> LoadedModel:
        current = self._current
        if current is not None and current.version == version:
            return current
        cached = self._cache.get(version)
        if cached is not None:
            self._cache.move_to_end(version)
            return cached
        return self.load(version)

    def _remember(self, loaded: LoadedModel) -> None:
        if self.version_cache_size <= 0:
            return
        self._cache[loaded.version] = loaded
        self._cache.move_to_end(loaded.version)
        while len(self._cache) > self.version_cache_size:
            self._cache.popitem(last=False)

    def get_version(self, version: int) -> LoadedModel:
        """A specific version for per-version inference (active one, cached, or loaded now)."""
        with self._lock:
            loaded = self._cached_or_load(version)
            if loaded is not self._current:
                self._remember(loaded)
            return loaded

    # ---- swapping ---------------------------------------------------------------------------
    def swap(self, loaded: LoadedModel) -> None:
        with self._lock:
            previous = self._current
            if previous is loaded:
                return
            self._current = loaded  # the atomic step
            self._cache.pop(loaded.version, None)
            if previous is not None:
                self._remember(previous)  # swapping back is instant
            if self.metrics is not None:
                self.metrics.model_version.set(loaded.version)
                if previous is not None:
                    self.metrics.model_swaps.inc()
        log.info("serving version %d (was %s)", loaded.version,
                 previous.version if previous is not None else "none")

    def refresh(self, force: bool = False) -> bool:
        """Swap to the store's active version if it changed; True when a swap happened.

        Never raises for a bad version: the failure is logged and counted, the old model
        keeps serving, and the version is retried after ``retry_failed_after_s``.
        """
        with self._lock:
            try:
                active = self.store.active_version()
            except Exception:
                log.warning("cannot read the active version; keeping the current model", exc_info=True)
                return False
            current = self._current
            if active is None or (current is not None and current.version == active):
                return False
            failed_at = self._failed.get(active)
            recently_failed = (failed_at is not None
                               and time.monotonic() - failed_at < self.retry_failed_after_s)
            if recently_failed and not force:
                return False
            try:
                loaded = self._cached_or_load(active)
            except Exception as exc:
                self._failed[active] = time.monotonic()
                if self.metrics is not None:
                    self.metrics.model_load_failures.inc()
                log.error("version %s failed to load (%s); still serving %s", active, exc,
                          current.version if current is not None else "nothing")
                return False
            self._failed.pop(active, None)
            self.swap(loaded)
            return True

    def activate(self, version: int, actor: str, reason: str) -> tuple[int | None, LoadedModel]:
        """Roll back / forward: verify + warm up first, then move the pointer, then swap.

        A version that does not load is never made active.
        """
        with self._lock:
            if self.store.get_version(version, weights=False) is None:
                raise UnknownVersion(version)
            loaded = self._cached_or_load(version)
            previous = self.store.activate(version, actor=actor, reason=reason)
            self.swap(loaded)
            return previous, loaded
