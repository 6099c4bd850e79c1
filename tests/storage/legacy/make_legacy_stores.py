"""Make the legacy store fixtures with the PREVIOUS release's code (fa542af).

The migration tests open these with the current code, so they must be written by the code
users run today, never by the code under test. How they were made (from /work/main)::

    git worktree add /tmp/legacy fa542af
    PYTHONPATH=/tmp/legacy python tests/storage/legacy/make_legacy_stores.py
    git worktree remove /tmp/legacy

Writes, beside this script:

- ``store_fa542af.db``: a SQLite store (WAL checkpointed, so the .db alone is complete);
- ``store_fa542af.pg.sql``: ``pg_dump --no-owner --no-privileges --inserts`` of a temporary
  PostgreSQL database filled the same way (dropped afterwards). ``SKQK_TEST_PG_ADMIN_URL``
  (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``) names the server.

Contents: 300 digits rows (64 features in [0, 1], labels 0..9) in two ingest batches (the
second with an idempotency key), versions 1 and 2 of an untrained ``mlp:64-16-10``, version
2 active through ``Store.activate`` (two promotions), one succeeded retrain job.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.core.network import DecoupledModel, ReLUNet
from app.core.spec import mlp
from app.serving.models import register_model
from app.storage import Store, open_store
from app.storage.schema import samples
from app.storage.store import utcnow

HERE = Path(__file__).resolve().parent
SQLITE_OUT = HERE / "store_fa542af.db"
PG_OUT = HERE / "store_fa542af.pg.sql"
PG_ADMIN_URL = os.environ.get("SKQK_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
JOB_ID = "legacy-job-0001"


def fill(store: Store) -> None:
    """The same content on every backend, through the old code's public API only."""
    digits = load_digits()
    x = (digits.data[:300] / 16.0).astype(np.float32)
    y = digits.target[:300].astype(np.int64)
    store.ingest(x[:200], y[:200])
    store.ingest(x[200:], y[200:], idempotency_key="legacy-batch-0002")

    spec = mlp([64, 16, 10])
    v1 = register_model(store, DecoupledModel.from_net(ReLUNet(spec, seed=0)), "full", None,
                        {"holdout_acc": 0.1, "source": "legacy fixture"}, data_watermark=200)
    store.activate(v1, actor="bootstrap", reason="first version")

    store.create_job(JOB_ID, "qk", runner="embedded:process")
    store.update_job(JOB_ID, status="running", started_at=utcnow(),
                     progress={"phase": "training", "epoch": 1, "val_acc": 0.5})
    v2 = register_model(store, DecoupledModel.from_net(ReLUNet(spec, seed=1)), "qk", v1,
                        {"holdout_acc": 0.12}, data_watermark=300, job_id=JOB_ID)
    store.activate(v2, actor="legacy-fixture", reason="promote the retrained candidate")
    store.update_job(JOB_ID, status="succeeded", finished_at=utcnow(),
                     result={"candidate_version": v2, "promoted": True})


def make_sqlite() -> None:
    for path in (SQLITE_OUT, *(SQLITE_OUT.with_name(SQLITE_OUT.name + s) for s in ("-wal", "-shm"))):
        path.unlink(missing_ok=True)
    store = open_store(f"sqlite:///{SQLITE_OUT}")
    fill(store)
    with store.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    store.dispose()
    for suffix in ("-wal", "-shm"):
        SQLITE_OUT.with_name(SQLITE_OUT.name + suffix).unlink(missing_ok=True)


def make_postgres() -> None:
    name = f"skqk_legacy_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name)
    try:
        store = open_store(url.render_as_string(hide_password=False))
        fill(store)
        store.dispose()
        env = {**os.environ, **({"PGPASSWORD": url.password} if url.password else {})}
        dump = subprocess.run(
            ["pg_dump", "--no-owner", "--no-privileges", "--inserts", "-h", url.host or "127.0.0.1",
             "-p", str(url.port or 5432), "-U", url.username or "postgres", name],
            check=True, capture_output=True, env=env).stdout
        PG_OUT.write_bytes(dump)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    # Refuse to run on the current code: the fixtures must come from the previous release.
    if "targets" in samples.c or samples.c.label.nullable:
        sys.exit("this is the new schema: put the previous release (fa542af) first on PYTHONPATH")
    make_sqlite()
    make_postgres()
    for path in (SQLITE_OUT, PG_OUT):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
