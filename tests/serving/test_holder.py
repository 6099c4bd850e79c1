"""Model holder: sha256-verified loading, warm-up, swaps, and a failed load keeps the old model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from app.core.checkpoint import ChecksumMismatch
from app.serving.holder import ModelHolder
from app.serving.metrics import ServingMetrics
from app.serving.models import load_model, register_model
from app.storage import Store, UnknownVersion


def _variant(store: Store, scale: float) -> int:
    """Register a copy of version 1 whose output layer is scaled (same predictions, other logits)."""
    model, _ = load_model(store, 1)
    model = copy.deepcopy(model)
    with torch.no_grad():
        last = [m for m in model.estimator.net.blocks if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return register_model(store, model, mode="qk", parent=1, metrics={"scale": scale})


def test_refresh_loads_and_swaps(sqlite_store: Store) -> None:
    metrics = ServingMetrics()
    holder = ModelHolder(sqlite_store, "cpu", metrics)
    assert holder.current is None and not holder.ready
    assert holder.refresh()
    assert holder.current.version == 1 and holder.ready
    assert not holder.refresh()  # unchanged
    v2 = _variant(sqlite_store, 2.0)
    sqlite_store.activate(v2, "test", "roll forward")
    old = holder.current
    assert holder.refresh()
    assert holder.current.version == v2
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    np.testing.assert_allclose(holder.current.infer(x), 2.0 * old.infer(x), rtol=1e-5, atol=1e-5)
    assert metrics.model_swaps._value.get() == 1
    assert metrics.model_version._value.get() == v2


def test_failed_load_keeps_the_old_model(sqlite_store: Store) -> None:
    metrics = ServingMetrics()
    holder = ModelHolder(sqlite_store, "cpu", metrics, retry_failed_after_s=3600)
    holder.refresh()
    v2 = _variant(sqlite_store, 3.0)
    record = sqlite_store.get_version(v2)
    tampered = bytearray(record.estimator_weights)
    tampered[-1] ^= 0xFF
    sqlite_store._set_weights_for_tests(v2, estimator_weights=bytes(tampered))
    with pytest.raises(ChecksumMismatch):
        load_model(sqlite_store, v2)
    # the pointer moves behind the holder's back: it must keep serving version 1
    sqlite_store.activate(v2, "test", "corrupt")
    assert not holder.refresh()
    assert holder.current.version == 1
    assert metrics.model_load_failures._value.get() == 1
    assert not holder.refresh()  # not retried in a tight loop
    assert metrics.model_load_failures._value.get() == 1


def test_activate_refuses_a_version_that_does_not_load(sqlite_store: Store) -> None:
    holder = ModelHolder(sqlite_store, "cpu")
    holder.refresh()
    v2 = _variant(sqlite_store, 0.5)
    sqlite_store._set_weights_for_tests(v2, selector_sha256="0" * 64)
    with pytest.raises(ChecksumMismatch):
        holder.activate(v2, "test", "should fail")
    assert sqlite_store.active_version() == 1 and holder.current.version == 1
    with pytest.raises(UnknownVersion):
        holder.activate(12345, "test", "missing")
    v3 = _variant(sqlite_store, 0.25)
    previous, loaded = holder.activate(v3, "test", "ok")
    assert (previous, loaded.version, sqlite_store.active_version()) == (1, v3, v3)


def test_specific_versions_are_cached(sqlite_store: Store) -> None:
    holder = ModelHolder(sqlite_store, "cpu", version_cache_size=1)
    holder.refresh()
    v2 = _variant(sqlite_store, 2.0)
    first = holder.get_version(v2)
    assert holder.get_version(v2) is first
    assert holder.get_version(1) is holder.current
    with pytest.raises(UnknownVersion):
        holder.get_version(999)
    # swapping to a cached version reuses it; the previous one becomes the cached one
    sqlite_store.activate(v2, "t", "t")
    previous = holder.current
    holder.refresh()
    assert holder.current is first
    sqlite_store.activate(1, "t", "back")
    holder.refresh()
    assert holder.current is previous
