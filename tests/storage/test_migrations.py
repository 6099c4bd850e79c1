"""Alembic migrations on stores made by the previous release (fa542af) and on empty stores.

The legacy fixtures in ``legacy/`` were written by that release's code (see
``legacy/make_legacy_stores.py``); everything here opens them with the current code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, insert, inspect, select, text, update
from sqlalchemy.engine import make_url

from app.storage import SampleSelection, Store
from app.storage import migrate as migrate_mod
from app.storage.migrate import (
    BASELINE,
    alembic_config,
    current_revision,
    downgrade_to,
    head_revision,
    upgrade_to_head,
)
from app.storage.schema import ingest_batches, metadata, model_versions, sample_audit, samples
from tests.helpers.pg import temporary_database
from tests.helpers.server import REPO, ServerProcess, fast_env

LEGACY = Path(__file__).parent / "legacy"
SQLITE_FIXTURE = LEGACY / "store_fa542af.db"
PG_FIXTURE = LEGACY / "store_fa542af.pg.sql"

# table → ORDER BY column, for a stable row-by-row comparison
LEGACY_TABLES = {"ingest_batches": "id", "samples": "id", "model_versions": "version",
                 "promotions": "id", "active_model": "id", "retrain_jobs": "job_id", "leases": "name"}
REV_0002 = "0002_targets_feature_schema"
REV_0003 = "0003_sample_quarantine"

UrlFactory = Callable[[], str]


# ---- stores -----------------------------------------------------------------------------------
def restore_pg_dump(url: str, dump: Path) -> None:
    """Load a plain pg_dump on its own connection (the dump empties search_path for it)."""
    sql = "\n".join(line for line in dump.read_text().splitlines()
                    if not line.startswith("\\"))  # psql meta-commands such as \restrict
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql)  # no parameters: one simple-protocol call runs every statement


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres" and os.environ.get("SKQK_TEST_POSTGRES") == "skip":
        pytest.skip("SKQK_TEST_POSTGRES=skip")
    return str(request.param)


@pytest.fixture
def empty_url(backend: str, tmp_path: Path) -> Iterator[UrlFactory]:
    """``empty_url()`` → the URL of a new empty store on the backend under test."""
    with ExitStack() as stack:
        count = iter(range(100))

        def make() -> str:
            if backend == "sqlite":
                folder = tmp_path / f"empty{next(count)}"
                folder.mkdir()
                return f"sqlite:///{folder / 'skqk.db'}"
            return stack.enter_context(temporary_database(prefix="skqk_mig"))

        yield make


@pytest.fixture
def legacy_url(backend: str, empty_url: UrlFactory, tmp_path: Path) -> str:
    """A private copy of the store the previous release wrote."""
    if backend == "sqlite":
        path = tmp_path / "legacy" / "skqk.db"
        path.parent.mkdir()
        shutil.copy2(SQLITE_FIXTURE, path)
        return f"sqlite:///{path}"
    url = empty_url()
    restore_pg_dump(url, PG_FIXTURE)
    return url


@pytest.fixture
def engines() -> Iterator[Callable[[str], Engine]]:
    """Plain engines for reading behind the store's back, disposed at teardown."""
    made: list[Engine] = []

    def make(url: str) -> Engine:
        made.append(create_engine(url))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


# ---- what a store holds -------------------------------------------------------------------------
def rows(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every row of every legacy table, by plain SQL (independent of the live schema)."""
    with engine.connect() as conn:
        return {t: [dict(r) for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY {key}")).mappings()]
                for t, key in LEGACY_TABLES.items()}


def project(snapshot: dict[str, list[dict[str, Any]]], like: dict[str, list[dict[str, Any]]]
            ) -> dict[str, list[dict[str, Any]]]:
    """``snapshot`` restricted to the columns ``like`` has (the new columns dropped)."""
    out = {}
    for table, table_rows in snapshot.items():
        cols = set(like[table][0]) if like[table] else set()
        out[table] = [{k: v for k, v in r.items() if k in cols} for r in table_rows]
    return out


def structure(engine: Engine) -> dict[str, Any]:
    """Tables, columns (type, nullability, default), keys and indexes, by reflection."""
    insp = inspect(engine)
    out: dict[str, Any] = {}
    for table in sorted(insp.get_table_names()):
        out[table] = {
            "columns": {c["name"]: (str(c["type"]), c["nullable"], str(c.get("default") or "").strip("()"))
                        for c in insp.get_columns(table)},
            "pk": insp.get_pk_constraint(table)["constrained_columns"],
            "fks": sorted((tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                          for f in insp.get_foreign_keys(table)),
            "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in insp.get_indexes(table)),
        }
    if engine.dialect.name == "sqlite":  # AUTOINCREMENT keeps ids (the data watermark) unique forever
        with engine.connect() as conn:
            out["autoincrement"] = sorted(n for n, sql in conn.exec_driver_sql(
                "SELECT name, sql FROM sqlite_master WHERE type = 'table'") if "AUTOINCREMENT" in sql)
    return out


def without_version_table(s: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in s.items() if k != "alembic_version"}


def migrate_to(url: str, revision: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), revision)
    finally:
        engine.dispose()


def check_legacy_content(before: dict[str, list[dict[str, Any]]]) -> None:
    """The fixture is what make_legacy_stores.py says it is."""
    assert len(before["samples"]) == 300
    assert len(before["ingest_batches"]) == 2
    assert [v["version"] for v in before["model_versions"]] == [1, 2]
    for v in before["model_versions"]:
        assert hashlib.sha256(v["selector_weights"]).hexdigest() == v["selector_sha256"]
        assert hashlib.sha256(v["estimator_weights"]).hexdigest() == v["estimator_sha256"]
    assert [(p["version"], p["previous_version"]) for p in before["promotions"]] == [(1, None), (2, 1)]
    assert before["active_model"][0]["version"] == 2
    assert [(j["job_id"], j["status"]) for j in before["retrain_jobs"]] == [("legacy-job-0001", "succeeded")]


# ---- tests --------------------------------------------------------------------------------------
def test_legacy_store_is_upgraded_and_keeps_everything(
        legacy_url: str, empty_url: UrlFactory, engines: Callable[[str], Engine],
        monkeypatch: pytest.MonkeyPatch) -> None:
    raw = engines(legacy_url)
    before = rows(raw)
    check_legacy_content(before)
    assert current_revision(raw) is None

    store = Store(legacy_url)
    try:
        store.create_schema()
        assert current_revision(raw) == head_revision()

        after = rows(raw)
        assert project(after, before) == before  # every legacy row and byte, unchanged
        assert all(v["feature_schema"] is None for v in after["model_versions"])
        assert all(s["targets"] is None for s in after["samples"])
        # 0003: nothing is quarantined, the audit trail starts empty
        assert all(s["quarantined_at"] is None and s["quarantine_audit_id"] is None for s in after["samples"])
        with raw.connect() as conn:
            assert conn.execute(select(sample_audit)).all() == []

        # the store API sees the same registry
        assert store.active_version() == 2
        v2 = store.get_version(2)
        assert v2 is not None
        assert v2.selector_weights == before["model_versions"][1]["selector_weights"]
        assert v2.estimator_sha256 == before["model_versions"][1]["estimator_sha256"]
        assert [p.version for p in store.promotions()] == [2, 1]
        job = store.get_job("legacy-job-0001")
        assert job is not None and job.status == "succeeded"

        # the upgraded store is exactly what a fresh one gets, and what the live metadata says
        fresh_url = empty_url()
        Store(fresh_url).create_schema()
        assert structure(raw) == structure(engines(fresh_url))
        with raw.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []

        # the new columns work: a regression row (no label) and a feature schema
        targets = np.array([1.5, -2.25, 3.0], dtype="<f4").tobytes()
        with raw.begin() as conn:
            new_id = conn.execute(insert(samples).values(
                batch_id=1, n_features=64, features=np.zeros(64, "<f4").tobytes(), label=None,
                targets=targets)).inserted_primary_key[0]
            conn.execute(update(model_versions).where(model_versions.c.version == 2)
                         .values(feature_schema={"names": ["f0"], "task": "classification"}))
        assert new_id > max(s["id"] for s in before["samples"])  # the watermark only grows
        with raw.connect() as conn:
            row = conn.execute(select(samples.c.label, samples.c.targets).where(samples.c.id == new_id)).one()
            schema = conn.execute(select(model_versions.c.feature_schema)
                                  .where(model_versions.c.version == 2)).scalar_one()
        assert row.label is None and row.targets == targets
        assert schema == {"names": ["f0"], "task": "classification"}

        # a second start is a no-op: no Alembic command runs, nothing changes
        def refuse(*_a: Any, **_k: Any) -> None:
            raise AssertionError("create_schema at head ran an Alembic command")

        monkeypatch.setattr(migrate_mod.command, "upgrade", refuse)
        monkeypatch.setattr(migrate_mod.command, "stamp", refuse)
        snapshot = rows(raw)
        store.create_schema()
        assert rows(raw) == snapshot
        assert current_revision(raw) == head_revision()
    finally:
        store.dispose()


def test_baseline_creates_exactly_the_legacy_tables(legacy_url: str, empty_url: UrlFactory,
                                                    engines: Callable[[str], Engine]) -> None:
    url = empty_url()
    migrate_to(url, BASELINE)
    assert without_version_table(structure(engines(url))) == structure(engines(legacy_url))


def test_fresh_store_ends_at_head_with_the_metadata_tables(empty_url: UrlFactory,
                                                           engines: Callable[[str], Engine]) -> None:
    url = empty_url()
    store = Store(url)
    try:
        store.create_schema()
        engine = engines(url)
        assert current_revision(engine) == head_revision()
        insp = inspect(engine)
        assert set(insp.get_table_names()) == set(metadata.tables) | {"alembic_version"}
        for name, table in metadata.tables.items():
            assert {c["name"] for c in insp.get_columns(name)} == set(table.c.keys()), name
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert store.active_version() is None  # singleton rows are there
        store.create_schema()  # and again: no-op
        assert current_revision(engine) == head_revision()
    finally:
        store.dispose()


def test_in_memory_sqlite_store_reaches_head() -> None:
    store = Store("sqlite://")
    store.create_schema()
    assert current_revision(store.engine) == head_revision()
    assert store.active_version() is None
    store.dispose()


def test_failed_upgrade_leaves_the_legacy_store_as_it_was(
        legacy_url: str, engines: Callable[[str], Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    raw = engines(legacy_url)
    before_rows, before_structure = rows(raw), structure(raw)
    real_upgrade = command.upgrade

    def upgrade_then_crash(*args: Any, **kwargs: Any) -> None:
        real_upgrade(*args, **kwargs)
        raise RuntimeError("crash after the DDL, before the commit")

    monkeypatch.setattr(migrate_mod.command, "upgrade", upgrade_then_crash)
    store = Store(legacy_url)
    try:
        with pytest.raises(RuntimeError, match="crash after the DDL"):
            store.create_schema()
        # one transaction (SQLite too): neither the stamp nor any column change stuck
        assert current_revision(raw) is None
        assert structure(raw) == before_structure
        assert rows(raw) == before_rows
        monkeypatch.setattr(migrate_mod.command, "upgrade", real_upgrade)
        store.create_schema()
        assert current_revision(raw) == head_revision()
    finally:
        store.dispose()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_sqlite_downgrade_to_baseline_and_upgrade_again(legacy_url: str,
                                                        engines: Callable[[str], Engine]) -> None:
    raw = engines(legacy_url)
    legacy_rows, legacy_structure = rows(raw), structure(raw)
    store = Store(legacy_url)
    try:
        store.create_schema()
        with raw.begin() as conn:
            regression_id = conn.execute(insert(samples).values(
                batch_id=1, n_features=64, features=np.zeros(64, "<f4").tobytes(), label=None,
                targets=np.ones(2, "<f4").tobytes())).inserted_primary_key[0]

        # the old schema cannot hold an unlabelled row: refused, and nothing changed
        with pytest.raises(RuntimeError, match="no label"):
            downgrade_to(store.engine, BASELINE)
        assert current_revision(raw) == head_revision()
        with raw.begin() as conn:
            conn.execute(samples.delete().where(samples.c.id == regression_id))

        downgrade_to(store.engine, BASELINE)
        assert current_revision(raw) == BASELINE
        assert without_version_table(structure(raw)) == legacy_structure
        assert rows(raw) == legacy_rows

        upgrade_to_head(store.engine)
        assert current_revision(raw) == head_revision()
        assert project(rows(raw), legacy_rows) == legacy_rows
        with raw.begin() as conn:  # the AUTOINCREMENT high-water mark survived both copies
            next_id = conn.execute(insert(samples).values(
                batch_id=1, n_features=64, features=np.zeros(64, "<f4").tobytes(),
                label=3)).inserted_primary_key[0]
        assert next_id == regression_id + 1
    finally:
        store.dispose()


def test_legacy_rows_load_and_can_be_quarantined_or_deleted_after_the_upgrade(
        legacy_url: str, engines: Callable[[str], Engine]) -> None:
    raw = engines(legacy_url)
    before = rows(raw)
    keyed = next(b["id"] for b in before["ingest_batches"] if b["idempotency_key"] == "legacy-batch-0002")
    second = [s for s in before["samples"] if s["batch_id"] == keyed]
    second_ids = [s["id"] for s in second]
    store = Store(legacy_url)
    try:
        store.create_schema()
        everything = store.load_samples(64)  # what a retrain reads: every legacy row, as stored
        assert everything.ids.tolist() == [s["id"] for s in before["samples"]]
        np.testing.assert_array_equal(everything.x, np.frombuffer(
            b"".join(s["features"] for s in before["samples"]), "<f4").reshape(-1, 64))
        np.testing.assert_array_equal(everything.y, [s["label"] for s in before["samples"]])

        done = store.quarantine_samples(SampleSelection(ingest_key="legacy-batch-0002"), "test", "legacy")
        assert done.affected == len(second_ids) == 100
        kept = [i for i in everything.ids.tolist() if i not in second_ids]
        assert store.load_samples(64).ids.tolist() == kept
        assert (store.sample_count(), store.quarantined_count()) == (200, 100)
        assert [(a.action, a.affected) for a in store.sample_audit().entries] == [("quarantine", 100)]

        # deleted, the legacy batch's key stays taken: the old client's retry stores nothing
        assert store.delete_samples(SampleSelection(batch_id=keyed), "test", "gone").affected == 100
        x = np.frombuffer(b"".join(s["features"] for s in second), "<f4").reshape(-1, 64)
        retry = store.ingest(x, np.array([s["label"] for s in second]), "legacy-batch-0002")
        assert retry.duplicate and store.sample_count() == 200 and store.quarantined_count() == 0
        fresh = store.ingest(x[:1], [1])
        assert fresh.total_samples == 201
        assert store.max_sample_id() > max(second_ids)  # ids of deleted rows are never reused
    finally:
        store.dispose()


def _insert_at_0002(engine: Engine) -> dict[str, int]:
    """Rows the 0002 schema can hold (class and regression samples, a keyed batch), written by
    SQL over exactly its columns; then its newest sample deleted, as an operator might have."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        def batch(key: str | None, n: int) -> int:
            res = conn.execute(insert(ingest_batches).values(
                idempotency_key=key, payload_sha256="0" * 64, count=n, created_at=now))
            return int(res.inserted_primary_key[0])

        def sample(batch_id: int, i: int, label: int | None, targets: bytes | None) -> int:
            return int(conn.execute(insert(samples).values(
                batch_id=batch_id, n_features=8, features=np.full(8, i, "<f4").tobytes(), label=label,
                targets=targets)).inserted_primary_key[0])

        plain, keyed = batch(None, 3), batch("at-0002", 3)
        ids = {"class": [sample(plain, i, i, None) for i in range(3)],
               "regression": [sample(keyed, i, None, np.array([i, -i], "<f4").tobytes()) for i in range(3)]}
        conn.execute(samples.delete().where(samples.c.id == ids["regression"][-1]))
    return {"plain": plain, "keyed": keyed, "top": ids["regression"].pop(), **{
        f"{k}_{n}": v for k, vs in ids.items() for n, v in enumerate(vs)}}


def test_store_at_0002_is_upgraded_to_head(empty_url: UrlFactory, engines: Callable[[str], Engine]) -> None:
    url = empty_url()
    migrate_to(url, REV_0002)  # the schema the previous code kept stores at
    raw = engines(url)
    assert current_revision(raw) == REV_0002
    made = _insert_at_0002(raw)
    before = rows(raw)

    store = Store(url)
    try:
        store.create_schema()
        assert current_revision(raw) == head_revision()
        after = project(rows(raw), before)
        assert (after["ingest_batches"], after["samples"]) == (before["ingest_batches"], before["samples"])
        assert all(s["quarantined_at"] is None for s in rows(raw)["samples"])
        fresh_url = empty_url()
        Store(fresh_url).create_schema()
        assert structure(raw) == structure(engines(fresh_url))
        with raw.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []

        class_ids = [made["class_0"], made["class_1"], made["class_2"]]
        assert store.load_samples(8).ids.tolist() == class_ids
        regression = store.load_samples(8, n_targets=2)
        assert regression.ids.tolist() == [made["regression_0"], made["regression_1"]]
        np.testing.assert_array_equal(regression.y, [[0, 0], [1, -1]])

        assert store.quarantine_samples(SampleSelection(ingest_key="at-0002"), "test", "x").affected == 2
        assert len(store.load_samples(8, n_targets=2)) == 0 and store.sample_count() == 3
        assert store.release_samples(SampleSelection(batch_id=made["keyed"]), "test").affected == 2
        # the id deleted at 0002 and the ones deleted now never come back (the watermark only grows)
        assert store.delete_samples(SampleSelection(from_id=class_ids[-1]), "test", "tail").affected == 3
        new = store.ingest(np.ones((1, 8), np.float32), [1])
        assert store.max_sample_id() == made["top"] + 1 and new.total_samples == 3
    finally:
        store.dispose()


def test_downgrade_below_0003_refuses_while_samples_are_quarantined(
        empty_url: UrlFactory, engines: Callable[[str], Engine]) -> None:
    reference = empty_url()
    migrate_to(reference, REV_0002)
    url = empty_url()
    raw = engines(url)
    store = Store(url)
    try:
        store.create_schema()
        store.ingest(np.ones((4, 3), np.float32), [0, 1, 2, 0], "k")
        ids = store.load_samples(3).ids.tolist()
        store.quarantine_samples(SampleSelection(ids=(ids[0],)), "test", "x")
        with pytest.raises(RuntimeError, match="1 samples are quarantined"):
            downgrade_to(store.engine, REV_0002)
        assert current_revision(raw) == head_revision() and store.quarantined_count() == 1

        store.release_samples(SampleSelection(ids=(ids[0],)), "test")
        store.delete_samples(SampleSelection(ids=(ids[-1],)), "test", "the newest row")
        downgrade_to(store.engine, REV_0002)  # drops the audit trail (logged), keeps every sample
        assert current_revision(raw) == REV_0002
        assert without_version_table(structure(raw)) == without_version_table(structure(engines(reference)))
        with raw.connect() as conn:
            assert conn.execute(select(samples.c.id).order_by(samples.c.id)).scalars().all() == ids[:3]

        upgrade_to_head(store.engine)
        store.ingest(np.zeros((1, 3), np.float32), [2])
        assert store.max_sample_id() == ids[-1] + 1  # the sequence survived SQLite's table copy
        assert store.sample_audit().entries == []
    finally:
        store.dispose()


def test_unknown_newer_revision_is_refused(empty_url: UrlFactory, engines: Callable[[str], Engine]) -> None:
    url = empty_url()
    store = Store(url)
    try:
        store.create_schema()
        with engines(url).begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
        with pytest.raises(RuntimeError, match="unknown to this release"):
            store.create_schema()
    finally:
        store.dispose()


@pytest.mark.slow
def test_concurrent_starts_upgrade_once(legacy_url: str, engines: Callable[[str], Engine]) -> None:
    """Replicas starting together on a legacy store: all succeed, the store ends at head."""
    raw = engines(legacy_url)
    before = rows(raw)
    code = "import sys; from app.storage import Store; s = Store(sys.argv[1]); s.create_schema(); s.dispose()"
    procs = [subprocess.Popen([sys.executable, "-c", code, legacy_url], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(4)]
    outputs = [(p.wait(120), p.stdout.read().decode(errors="replace") if p.stdout else "") for p in procs]
    assert all(rc == 0 for rc, _ in outputs), outputs
    assert current_revision(raw) == head_revision()
    assert project(rows(raw), before) == before


@pytest.mark.slow
def test_server_serves_the_upgraded_sqlite_store(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy2(SQLITE_FIXTURE, data_dir / "skqk.db")
    server = ServerProcess(data_dir, fast_env(data_dir)).start()
    try:
        with server.client() as client:
            resp = client.post("/predict", json={"inputs": [[0.25] * 64]})
            assert resp.status_code == 200, resp.text
            assert resp.json()["model_version"] == 2
            assert len(resp.json()["predictions"]) == 1
            versions = client.get("/models").json()
            assert [(v["version"], v["active"]) for v in versions] == [(1, False), (2, True)]
    finally:
        server.stop()
