"""The SQL store on SQLite and on a real PostgreSQL (every test runs on both)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from sqlalchemy import select

from app.storage import IdempotencyConflict, Store, UnknownVersion
from app.storage.schema import ingest_batches, promotions


def _batch(n: int = 5, d: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 3, n)


def _register(store: Store, tag: bytes = b"x", parent: int | None = None) -> int:
    return store.register_version({"name": "t", "input_shape": [4], "layers": []}, b"sel" + tag,
                                  b"est" + tag, "qk", parent, {"holdout_acc": 0.5})


def test_ingest_roundtrip_and_watermark(store: Store) -> None:
    x, y = _batch(7)
    first = store.ingest(x, y)
    assert (first.accepted, first.duplicate, first.total_samples) == (7, False, 7)
    watermark = store.max_sample_id()
    x2, y2 = _batch(3, seed=1)
    store.ingest(x2, y2)
    assert store.max_sample_id() > watermark
    everything = store.load_samples(4)
    assert len(everything) == 10
    assert np.all(np.diff(everything.ids) > 0)
    np.testing.assert_array_equal(everything.x[:7], x)  # float32 bytes round-trip exactly
    np.testing.assert_array_equal(everything.y[7:], y2)
    snapshot = store.load_samples(4, max_id=watermark)
    assert len(snapshot) == 7
    assert store.load_samples(5).x.shape == (0, 5)  # other widths are separate


def test_repeated_idempotency_key_stores_nothing_twice(store: Store) -> None:
    x, y = _batch(5)
    first = store.ingest(x, y, "key-1")
    again = store.ingest(x, y, "key-1")
    assert not first.duplicate and again.duplicate
    assert again.accepted == 5 and again.batch_id == first.batch_id
    assert store.sample_count() == 5
    with pytest.raises(IdempotencyConflict):
        store.ingest(x + 1, y, "key-1")  # same key, other payload
    assert store.sample_count() == 5


def test_concurrent_ingests_with_one_key_store_once(store: Store) -> None:
    x, y = _batch(50)
    results, errors = [], []
    barrier = threading.Barrier(6)

    def worker() -> None:
        barrier.wait()
        try:
            results.append(store.ingest(x, y, "same-key"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(not r.duplicate for r in results) == 1
    assert store.sample_count() == 50


def test_ingest_is_one_transaction(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _batch(4)
    real_insert = store._insert_samples

    def insert_then_fail(conn, batch_id, xb, yb):  # the rows went in (COPY / bulk SQL), then a crash
        real_insert(conn, batch_id, xb, yb)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "_insert_samples", insert_then_fail)
    with pytest.raises(RuntimeError):
        store.ingest(x, y, "atomic")
    monkeypatch.undo()
    assert store.sample_count() == 0
    assert store.get_ingest_batch("atomic") is None  # the batch row rolled back too
    assert store.ingest(x, y, "atomic").accepted == 4  # and the key is still free


def test_versions_are_monotonic_and_hashed(store: Store) -> None:
    v1 = _register(store, b"1")
    v2 = _register(store, b"2", parent=v1)
    assert v2 > v1
    rec = store.get_version(v2)
    assert rec is not None and rec.parent == v1 and rec.mode == "qk"
    assert rec.selector_weights == b"sel2"
    import hashlib
    assert rec.estimator_sha256 == hashlib.sha256(b"est2").hexdigest()
    summary = store.list_versions()
    assert [r.version for r in summary] == [v1, v2]
    assert summary[0].selector_weights is None  # listing does not drag weights along
    assert rec.created_at.tzinfo is not None
    with pytest.raises(ValueError):
        store.register_version({}, b"", b"", "sideways", None, {})


def test_metrics_json_is_cleaned(store: Store) -> None:
    v = store.register_version({"name": "t"}, b"a", b"b", "full", None,
                               {"loss": float("inf"), "acc": np.float64(0.5), "nested": [float("nan")]})
    assert store.get_version(v).metrics == {"loss": None, "acc": 0.5, "nested": [None]}


def test_compare_and_set_activation(store: Store) -> None:
    v1, v2, v3 = (_register(store, bytes([i])) for i in range(3))
    assert store.active_version() is None
    assert store.compare_and_set_active(v1, None, "test", "first")
    assert not store.compare_and_set_active(v2, None, "test", "stale: expected none")
    assert store.compare_and_set_active(v2, v1, "test", "forward")
    # a stale worker trained against v1 cannot overwrite the newer promotion
    assert not store.compare_and_set_active(v3, v1, "stale-worker", "late")
    assert store.active_version() == v2
    with pytest.raises(UnknownVersion):
        store.compare_and_set_active(999, v2, "test", "nope")
    assert store.activate(v1, "ops", "rollback") == v2
    history = store.promotions()
    assert [(p.version, p.previous_version) for p in history] == [(v1, v2), (v2, v1), (v1, None)]
    assert history[0].actor == "ops" and history[0].reason == "rollback"


def test_concurrent_compare_and_set_has_one_winner(store: Store) -> None:
    base = _register(store, b"base")
    store.compare_and_set_active(base, None, "t", "init")
    candidates = [_register(store, bytes([i])) for i in range(5)]
    wins: list[int] = []
    barrier = threading.Barrier(len(candidates))

    def worker(v: int) -> None:
        barrier.wait()
        if store.compare_and_set_active(v, base, "t", "race"):
            wins.append(v)

    threads = [threading.Thread(target=worker, args=(v,)) for v in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.active_version() == wins[0]
    with store.engine.connect() as conn:
        assert len(conn.execute(select(promotions)).all()) == 2


def test_jobs_and_progress(store: Store) -> None:
    job = store.create_job("j1", "qk", runner="test")
    assert job.status == "queued" and job.progress == {}
    store.update_job("j1", status="running", progress={"epoch": 1, "val_loss": float("nan")})
    got = store.get_job("j1")
    assert got.status == "running" and got.progress == {"epoch": 1, "val_loss": None}
    store.update_job("j1", status="succeeded", result={"promoted": True})
    assert store.get_job("j1").to_dict()["result"] == {"promoted": True}
    assert store.get_job("nope") is None
    with pytest.raises(ValueError):
        store.update_job("j1", status="exploded")


def test_leases_single_flight_and_expiry(store: Store) -> None:
    assert store.try_acquire_lease("retrain", "a", ttl_s=30)
    assert not store.try_acquire_lease("retrain", "b", ttl_s=30)
    assert store.lease_holder("retrain") == "a"
    assert store.renew_lease("retrain", "a", ttl_s=30)
    assert not store.renew_lease("retrain", "b", ttl_s=30)
    store.release_lease("retrain", "b")  # not the holder: no effect
    assert store.lease_holder("retrain") == "a"
    store.release_lease("retrain", "a")
    assert store.lease_holder("retrain") is None
    assert store.try_acquire_lease("retrain", "c", ttl_s=0.2)
    time.sleep(0.3)
    assert store.lease_holder("retrain") is None  # expired: a crashed holder does not block forever
    assert store.try_acquire_lease("retrain", "d", ttl_s=30)


def test_orphaned_jobs_are_failed(store: Store) -> None:
    store.create_job("alive", "qk", runner="t")
    store.create_job("dead", "qk", runner="t")
    store.try_acquire_lease("retrain", "alive", ttl_s=30)
    assert store.fail_orphaned_jobs() == ["dead"]
    assert store.get_job("dead").status == "failed"
    assert store.get_job("alive").status == "queued"


def test_schema_creation_is_idempotent(store: Store) -> None:
    store.ingest(*_batch(2), idempotency_key="k")
    store.create_schema()
    store.create_schema()
    assert store.sample_count() == 2
    with store.engine.connect() as conn:
        assert conn.execute(select(ingest_batches.c.idempotency_key)).scalar_one() == "k"
