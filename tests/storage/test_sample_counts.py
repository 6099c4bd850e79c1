"""Revision 0004: ``sample_count()`` without a scan, exact through every change, on both backends.

The count is kept by triggers (``sample_counts``), so it must agree with ``count(*)`` after
ingests, duplicates, quarantines, releases and deletes, after rows written by plain SQL (an
older release during a rolling upgrade), under concurrent ingest on PostgreSQL, and on a store
that was made at 0003 and upgraded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, insert, select

from app.storage import SampleSelection, Store
from app.storage.migrate import current_revision, downgrade_to, head_revision
from app.storage.schema import ingest_batches, metadata, sample_counts, samples
from tests.helpers.pg import temporary_database
from tests.storage.test_migrations import migrate_to

REV_0003 = "0003_sample_quarantine"


@pytest.fixture(params=["sqlite", "postgres"])
def url_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], str]]:
    with ExitStack() as stack:
        count = iter(range(100))

        def make() -> str:
            if request.param == "sqlite":
                return f"sqlite:///{tmp_path / f's{next(count)}.db'}"
            if os.environ.get("SKQK_TEST_POSTGRES") == "skip":
                pytest.skip("SKQK_TEST_POSTGRES=skip")
            return stack.enter_context(temporary_database(prefix="skqk_cnt"))

        yield make


def true_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(samples)
                                .where(samples.c.quarantined_at.is_(None))).scalar_one())


def old_release_ingest(engine: Engine, n: int, key: str | None = None) -> None:
    """What the release before 0004 does on ingest: a batch row and its samples, plain SQL."""
    with engine.begin() as conn:
        batch = conn.execute(insert(ingest_batches).values(
            idempotency_key=key, payload_sha256="0" * 64, count=n, created_at=datetime.now(UTC)))
        batch_id = int(batch.inserted_primary_key[0])
        conn.execute(insert(samples), [{"batch_id": batch_id, "n_features": 3, "label": i % 3,
                                        "features": np.full(3, i, "<f4").tobytes()} for i in range(n)])


def test_count_is_exact_through_every_change(url_factory: Callable[[], str]) -> None:
    store = Store(url_factory())
    try:
        store.create_schema()
        assert store.sample_count() == 0
        first = store.ingest(np.ones((5, 3), np.float32), [0, 1, 2, 0, 1], "k1")
        assert first.total_samples == store.sample_count() == 5
        assert store.ingest(np.ones((5, 3), np.float32), [0, 1, 2, 0, 1], "k1").duplicate
        assert store.sample_count() == 5  # a duplicate stores (and counts) nothing
        ids = store.load_samples(3).ids.tolist()
        store.quarantine_samples(SampleSelection(ids=(ids[0], ids[1])), "t", "x")
        store.quarantine_samples(SampleSelection(ids=(ids[0], ids[2])), "t", "x")  # one already out
        assert store.sample_count() == 2 and store.quarantined_count() == 3
        store.delete_samples(SampleSelection(ids=(ids[0], ids[3])), "t", "one quarantined, one not")
        assert store.sample_count() == 1
        store.release_samples(SampleSelection(from_id=ids[0]), "t")
        assert store.sample_count() == 3
        old_release_ingest(store.engine, 4)  # an older replica, mid rolling upgrade
        assert store.sample_count() == 7
        with store.engine.begin() as conn:  # a hand-written fix
            conn.execute(samples.delete().where(samples.c.id == ids[-1]))
        assert store.sample_count() == true_count(store.engine) == 6
        with store.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(sample_counts)).scalar_one() == 16
    finally:
        store.dispose()


def test_store_made_at_0003_is_upgraded_with_its_rows_counted(url_factory: Callable[[], str]) -> None:
    url = url_factory()
    migrate_to(url, REV_0003)
    at_0003 = Store(url)
    try:
        old_release_ingest(at_0003.engine, 30, "old")
        with at_0003.engine.begin() as conn:  # quarantined at 0003: not counted
            conn.execute(samples.update().where(samples.c.id <= 4).values(quarantined_at=datetime.now(UTC)))
        assert current_revision(at_0003.engine) == REV_0003
        at_0003.create_schema()
        assert current_revision(at_0003.engine) == head_revision()
        assert at_0003.sample_count() == true_count(at_0003.engine) == 26
        with at_0003.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        at_0003.ingest(np.zeros((2, 3), np.float32), [0, 1])
        at_0003.release_samples(SampleSelection(to_id=2), "t")
        assert at_0003.sample_count() == true_count(at_0003.engine) == 30

        downgrade_to(at_0003.engine, REV_0003)  # triggers and table gone: the old code runs as before
        old_release_ingest(at_0003.engine, 3)
        at_0003.create_schema()  # and back: counted afresh
        assert at_0003.sample_count() == true_count(at_0003.engine) == 33
    finally:
        at_0003.dispose()


def test_concurrent_ingests_and_quarantines_keep_it_exact(url_factory: Callable[[], str]) -> None:
    store = Store(url_factory())
    try:
        store.create_schema()
        errors: list[BaseException] = []

        def ingest(worker: int) -> None:
            try:
                for i in range(15):
                    store.ingest(np.full((7, 3), worker, np.float32), [0] * 7, f"w{worker}-{i}")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def quarantine() -> None:
            try:
                for lo in range(1, 300, 20):
                    store.quarantine_samples(SampleSelection(from_id=lo, to_id=lo + 9), "t", "x")
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)

        threads = [threading.Thread(target=ingest, args=(w,)) for w in range(4)]
        threads.append(threading.Thread(target=quarantine))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert store.sample_count() == true_count(store.engine)
        assert store.sample_count() + store.quarantined_count() == 4 * 15 * 7
    finally:
        store.dispose()
