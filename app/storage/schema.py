"""SQL schema (SQLAlchemy Core). Portable: the same tables on SQLite and PostgreSQL.

- ``samples.id`` is the data watermark: it only grows (``AUTOINCREMENT`` on SQLite, a
  sequence on Postgres), so "all samples up to id W" is a stable snapshot.
- ``ingest_batches.idempotency_key`` is UNIQUE: a retried ingest collides on the constraint
  instead of being checked-then-inserted, which is also race-free across replicas.
- ``active_model`` is one row; it changes only by compare-and-set on the expected version.
- ``promotions`` is append-only history; ``retrain_jobs`` is the source of truth for job
  status; ``leases`` holds named single-flight leases (retrain, bootstrap).
- ``samples.label`` is NULL for regression rows, whose ``targets`` are float32 bytes;
  ``model_versions.feature_schema`` is NULL for versions stored before it existed.
- ``samples.quarantined_at`` set: an operator took the row out of every retrain (and its
  holdout) without deleting it; ``quarantine_audit_id`` is the ``sample_audit`` row that did
  it (who, why, which selector). ``sample_audit`` is append-only: one row per quarantine,
  release or delete, written in the same transaction as the change it records.

Every change here needs an Alembic revision in ``app/storage/migrations/versions`` (see
docs/UPGRADING.md): stores are upgraded by migrations, never by ``create_all``.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    text,
)

metadata = MetaData()

# SQLite only autoincrements an INTEGER PRIMARY KEY; Postgres gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")
UTCDateTime = DateTime(timezone=True)

ingest_batches = Table(
    "ingest_batches", metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(200), unique=True, nullable=True),
    Column("payload_sha256", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    sqlite_autoincrement=True,
)

samples = Table(
    "samples", metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("batch_id", BigId, ForeignKey("ingest_batches.id"), nullable=False, index=True),
    Column("n_features", Integer, nullable=False),
    Column("features", LargeBinary, nullable=False),  # little-endian float32
    Column("label", Integer, nullable=True),  # NULL: a regression row (see targets)
    # server-side default: one fewer bound parameter per row keeps bulk ingest cheap
    Column("created_at", UTCDateTime, nullable=False, server_default=func.current_timestamp()),
    # last, where the 0002 migration's ADD COLUMN puts it: fresh and upgraded stores match
    Column("targets", LargeBinary, nullable=True),  # regression targets, little-endian float32
    # 0003: NULL = used by retrains; set = quarantined (kept, but out of every retrain)
    Column("quarantined_at", UTCDateTime, nullable=True),
    Column("quarantine_audit_id", BigInteger, nullable=True),  # the sample_audit row that did it
    # 0005: the row as it came (JSON array of column values) for schemas with column types
    Column("raw", Text, nullable=True),
    # Partial: only quarantined rows are in it, so it is tiny, and a retrain's
    # "quarantined_at IS NULL" scan can never be planned through it (it stays a primary-key
    # range scan); it serves the quarantined count and quarantined=true listings.
    Index("ix_samples_quarantined", "id", sqlite_where=text("quarantined_at IS NOT NULL"),
          postgresql_where=text("quarantined_at IS NOT NULL")),
    sqlite_autoincrement=True,
)

model_versions = Table(
    "model_versions", metadata,
    Column("version", Integer, primary_key=True, autoincrement=True),
    Column("parent", Integer, nullable=True),
    Column("mode", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("architecture", JSON, nullable=False),
    Column("selector_weights", LargeBinary, nullable=False),  # safetensors bytes
    Column("selector_sha256", String(64), nullable=False),
    Column("estimator_weights", LargeBinary, nullable=False),
    Column("estimator_sha256", String(64), nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("data_watermark", BigInteger, nullable=True),
    Column("job_id", String(64), nullable=True),
    # names, shape, task, classes…; NULL for versions stored before revision 0002
    Column("feature_schema", JSON, nullable=True),
    sqlite_autoincrement=True,
)

promotions = Table(
    "promotions", metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("version", Integer, nullable=False),
    Column("previous_version", Integer, nullable=True),
    Column("actor", String(100), nullable=False),
    Column("reason", Text, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    sqlite_autoincrement=True,
)

active_model = Table(
    "active_model", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
    Column("version", Integer, nullable=True),
    Column("updated_at", UTCDateTime, nullable=True),
)

retrain_jobs = Table(
    "retrain_jobs", metadata,
    Column("job_id", String(64), primary_key=True),
    Column("mode", String(16), nullable=False),
    Column("status", String(16), nullable=False, index=True),  # queued|running|succeeded|failed|cancelled
    Column("runner", String(32), nullable=False),
    Column("progress", JSON, nullable=False),
    Column("result", JSON, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
)

leases = Table(
    "leases", metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(64), nullable=True),
    Column("expires_at", Float, nullable=True),  # epoch seconds
)

# 0004: the count of samples retrains use (stored, not quarantined) is the sum of ``n``. Kept
# by triggers in the database (see the revision) in the transaction of every ingest, delete,
# quarantine and release; 16 slots so that concurrent ingests update different rows.
sample_counts = Table(
    "sample_counts", metadata,
    Column("slot", Integer, primary_key=True, autoincrement=False),
    Column("n", BigInteger, nullable=False),
)

sample_audit = Table(
    "sample_audit", metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime, nullable=False),
    Column("actor", String(200), nullable=False),  # api:<client host> …, cli:<user>@<host>
    Column("action", String(16), nullable=False),  # quarantine | release | delete
    Column("selector", JSON, nullable=False),  # {"ids": […]}, {"from_id", "to_id"}, {"ingest_key"}, …
    Column("affected", BigInteger, nullable=False),  # rows whose state this action changed
    Column("reason", Text, nullable=True),
    sqlite_autoincrement=True,
)

LEASE_NAMES = ("retrain", "bootstrap")
SAMPLE_ACTIONS = ("quarantine", "release", "delete")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
