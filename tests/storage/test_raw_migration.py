"""Revision 0005 (``samples.raw``) on a store written by the code before it (store_0004.db, see
legacy/make_store_0004.py): numeric rows load unchanged, typed rows keep their raw values, and
the downgrade drops only the column."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from app.storage import open_store
from app.storage.migrate import current_revision, downgrade_to
from tests.helpers.pg import temporary_database

FIXTURE = Path(__file__).parent / "legacy" / "store_0004.db"


def test_0005_on_a_store_of_the_previous_code(tmp_path: Path) -> None:
    path = tmp_path / "skqk.db"
    shutil.copy2(FIXTURE, path)
    url = f"sqlite:///{path}"
    plain = create_engine(url)
    with plain.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0004_sample_counts"
        before = conn.execute(text("SELECT id, features, label FROM samples ORDER BY id")).all()
    plain.dispose()

    store = open_store(url)  # upgrades to head
    assert current_revision(store.engine) == "0005_sample_raw"
    old = store.load_samples(64)
    assert [int(i) for i in old.ids] == [r[0] for r in before]
    np.testing.assert_array_equal(old.x, np.frombuffer(b"".join(r[1] for r in before), "<f4").reshape(-1, 64))
    assert all(raw is None for _, raw in store.raw_rows())  # numeric rows: no raw values
    assert store.sample_count() == 300

    # typed rows: encoded features as always, plus the raw values as they came
    x = np.ones((2, 64), np.float32)
    store.ingest(x, np.array([1, 2]), raw=['["a",null,true]', '["b",1.5,null]'], idempotency_key="t")
    store.ingest(x, np.array([3, 4]))  # numeric rows still go in as before
    assert store.raw_rows(after_id=300) == [(301, '["a",null,true]'), (302, '["b",1.5,null]'),
                                            (303, None), (304, None)]
    assert store.sample_count() == 304 and len(store.load_samples(64)) == 304

    downgrade_to(store.engine, "0004_sample_counts")
    with store.engine.connect() as conn:
        cols = [r[1] for r in conn.execute(text("PRAGMA table_info(samples)"))]
        assert "raw" not in cols
        assert conn.execute(text("SELECT count(*) FROM samples")).scalar() == 304
    store.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'skqk.db'}"
        return
    if os.environ.get("SKQK_TEST_POSTGRES") == "skip":
        pytest.skip("SKQK_TEST_POSTGRES=skip")
    with temporary_database(prefix="skqk_raw") as url:
        yield url


def test_raw_rows_come_back_exactly(store_url: str) -> None:
    """Every insert path (SQLite: rows padded to one width, or JSON pairs for a very long row;
    PostgreSQL: COPY) keeps each raw row byte for byte, beside its label or targets."""
    store = open_store(store_url)
    x = np.ones((3, 2), np.float32)
    short = ['["a"]', '["bb",1]', '["ü ",null]']
    long = ['["' + "x" * 3_000_000 + '"]', "[1]", "[2]"]
    store.ingest(x, np.array([1, 2, 3]), raw=short)
    store.ingest(x, np.array([4, 5, 6]), raw=long)
    store.ingest(x, targets=np.array([[0.5], [1.5], [2.5]]), raw=short)
    assert [r for _, r in store.raw_rows()] == short + long + short
    assert store.load_samples(2).y.tolist() == [1, 2, 3, 4, 5, 6]
    store.dispose()
