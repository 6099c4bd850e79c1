"""Bring a store's schema to the newest Alembic revision, one process at a time.

Every process that opens a store (API replicas, workers, the CLI) calls ``upgrade_to_head``
through ``Store.create_schema``; they may start together, so the upgrade runs under a lock:
``pg_advisory_lock`` on a dedicated connection (PostgreSQL) or ``flock`` on a file beside the
.db (SQLite). The revisions live in ``app/storage/migrations``; ``python -m app.storage.migrate``
upgrades the configured store by hand.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from app.storage.migrations import MIGRATIONS_DIR

log = logging.getLogger("skqk.storage")

BASELINE = "0001_baseline"
# What the last release without Alembic (fa542af) created; such a store is stamped BASELINE.
LEGACY_TABLES = frozenset({"ingest_batches", "samples", "model_versions", "promotions", "active_model",
                           "retrain_jobs", "leases"})
# pg_advisory_lock key ("skqkmigr"); advisory locks are per database, so stores never contend.
PG_LOCK_KEY = 0x736B716B6D696772


def alembic_config(connection: Connection | None = None) -> Config:
    """Programmatic config: the packaged scripts, and the connection env.py must run on."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))  # ConfigParser
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no Alembic revisions under {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The store's revision; None for an empty store or one made before migrations existed."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def migration_lock(engine: Engine) -> Iterator[None]:
    """Serialise migrators of one store across processes (and threads)."""
    backend = engine.dialect.name
    if backend == "postgresql":
        # session-level lock on its own connection: held across the upgrade's commit, and
        # released by the server if this process dies
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": PG_LOCK_KEY})
            try:
                yield
            finally:
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PG_LOCK_KEY})
                except Exception:
                    conn.invalidate()  # never return a connection still holding the lock to the pool
                    raise
    elif backend == "sqlite":
        database = engine.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            yield  # in-memory: a single process by construction
            return
        db = Path(database)
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".migrate.lock"), "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # dropped by the kernel if this process dies
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    else:
        log.warning("no migration lock for %s: start one process first", backend)
        yield


@contextmanager
def _transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction for the whole upgrade: a failure leaves the store as it was."""
    with engine.connect() as conn, conn.begin():
        if engine.dialect.name == "sqlite":
            # pysqlite runs DDL outside any transaction unless one was begun explicitly
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield conn


def _prepare(conn: Connection, cfg: Config, current: str | None) -> str | None:
    """Make the version table tell the truth; the revision to upgrade from."""
    ours = LEGACY_TABLES & set(inspect(conn).get_table_names())
    if current is None and ours:
        missing = LEGACY_TABLES - ours
        if missing:
            raise RuntimeError(f"store without a revision lacks tables {sorted(missing)}: not one "
                               "made by a previous release; refusing to guess its schema")
        log.info("store made before migrations existed: stamping %s", BASELINE)
        command.stamp(cfg, BASELINE)
        return BASELINE
    if current is not None and not ours:
        # a version row but none of our tables (dropped by hand or by tests): start from empty
        log.warning("store at %s has none of its tables: upgrading from empty", current)
        command.stamp(cfg, "base", purge=True)
        return None
    return current


def upgrade_to_head(engine: Engine) -> str:
    """Empty → head; made by the previous release → stamp baseline, then head; at head: no-op."""
    head = head_revision()
    script = ScriptDirectory.from_config(alembic_config())
    with migration_lock(engine), _transaction(engine) as conn:
        cfg = alembic_config(conn)
        current = _prepare(conn, cfg, MigrationContext.configure(conn).get_current_revision())
        if current == head:
            return head
        if current is not None and current not in {s.revision for s in script.walk_revisions()}:
            raise RuntimeError(f"store is at revision {current!r}, unknown to this release (head "
                               f"{head!r}): it was upgraded by a newer release")
        log.info("upgrading store schema from %s to %s", current or "empty", head)
        command.upgrade(cfg, "head")
    return head


def downgrade_to(engine: Engine, revision: str) -> None:
    """Downgrade (e.g. to BASELINE before going back to an older release), under the lock."""
    with migration_lock(engine), _transaction(engine) as conn:
        command.downgrade(alembic_config(conn), revision)


def main() -> None:
    from app.settings import Settings
    from app.storage.connection import make_engine

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = make_engine(Settings().resolved_database_url)
    try:
        print(f"store at {upgrade_to_head(engine)}")
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
