"""Baseline: the tables of the last release without Alembic (fa542af).

Revision ID: 0001_baseline
Revises:
Create Date: 2026-11-26

A copy of that release's app/storage/schema.py as explicit tables, so the DDL stays what
``metadata.create_all`` produced then, whatever the live schema becomes. Stores made by that
release are stamped with this revision instead of running it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None

# As in that schema: SQLite only autoincrements an INTEGER PRIMARY KEY, Postgres gets BIGSERIAL.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTCDateTime = sa.DateTime(timezone=True)

TABLES = ("ingest_batches", "samples", "model_versions", "promotions", "active_model",
          "retrain_jobs", "leases")


def upgrade() -> None:
    op.create_table(
        "ingest_batches",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("idempotency_key", sa.String(200), unique=True, nullable=True),
        sa.Column("payload_sha256", sa.String(64), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "samples",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("batch_id", BigId, sa.ForeignKey("ingest_batches.id"), nullable=False),
        sa.Column("n_features", sa.Integer, nullable=False),
        sa.Column("features", sa.LargeBinary, nullable=False),
        sa.Column("label", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False, server_default=sa.func.current_timestamp()),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_samples_batch_id", "samples", ["batch_id"])
    op.create_index("ix_samples_n_features", "samples", ["n_features"])
    op.create_table(
        "model_versions",
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("parent", sa.Integer, nullable=True),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("architecture", sa.JSON, nullable=False),
        sa.Column("selector_weights", sa.LargeBinary, nullable=False),
        sa.Column("selector_sha256", sa.String(64), nullable=False),
        sa.Column("estimator_weights", sa.LargeBinary, nullable=False),
        sa.Column("estimator_sha256", sa.String(64), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("data_watermark", sa.BigInteger, nullable=True),
        sa.Column("job_id", sa.String(64), nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "promotions",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("previous_version", sa.Integer, nullable=True),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "active_model",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.Integer, nullable=True),
        sa.Column("updated_at", UTCDateTime, nullable=True),
    )
    op.create_table(
        "retrain_jobs",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("runner", sa.String(32), nullable=False),
        sa.Column("progress", sa.JSON, nullable=False),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_retrain_jobs_status", "retrain_jobs", ["status"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(64), nullable=True),
        sa.Column("expires_at", sa.Float, nullable=True),
    )


def downgrade() -> None:
    for table in reversed(TABLES):  # children before the tables they reference
        op.drop_table(table)
