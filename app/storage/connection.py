"""An engine with the right settings per backend (SQLite pragmas; libpq timeouts and the guard)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from app.storage.guard import LIBPQ_DRIVERS, StoreTimeouts, install_guard, libpq_connect_args


def make_engine(url: str, timeouts: StoreTimeouts | None = None) -> Engine:
    """An engine with sane settings per backend (SQLite: WAL, fsync on commit, busy wait; libpq:
    connect/statement/pool timeouts, TCP keepalives and the call-timeout guard of app.storage.guard).

    ``timeouts`` default to the ``SKQK_DB_*`` / ``SKQK_STORE_TIMEOUT_S`` settings.
    """
    t = timeouts or StoreTimeouts.from_settings()
    if url.startswith("sqlite"):
        parsed = make_url(url)
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        busy_s = t.statement_s if t.statement_s > 0 else 86_400.0  # 0: wait (practically) forever
        # a file gets a QueuePool (with a timeout); in memory, SQLAlchemy uses a one-connection pool
        in_memory = not database or database == ":memory:" or parsed.query.get("mode") == "memory"
        pool = {} if in_memory else {"pool_timeout": t.pool_s}
        engine = create_engine(url, **pool, connect_args={"timeout": busy_s, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # a committed ingest survives power loss too
            cur.execute(f"PRAGMA busy_timeout={int(busy_s * 1000)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    parsed = make_url(url)
    if parsed.get_driver_name() in LIBPQ_DRIVERS:
        engine = create_engine(url, pool_size=5, max_overflow=10, pool_timeout=t.pool_s,
                               connect_args=libpq_connect_args(parsed, t))
        install_guard(engine, t)  # pings on checkout itself, within the call timeout
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, pool_timeout=t.pool_s)
