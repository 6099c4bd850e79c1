"""Sample administration: quarantined samples and an append-only audit trail.

Revision ID: 0003_sample_quarantine
Revises: 0002_targets_feature_schema
Create Date: 2026-12-01

- ``samples.quarantined_at`` (timestamp, nullable): set = the row is out of every retrain;
- ``samples.quarantine_audit_id`` (bigint, nullable): the ``sample_audit`` row that did it;
- ``ix_samples_quarantined``: a partial index over the quarantined rows only (tiny; a
  retrain's scan of the rows *not* quarantined never goes through it);
- ``sample_audit``: one row per quarantine / release / delete (who, when, selector, rows
  affected, reason).

Both columns are plain nullable ``ADD COLUMN`` s, which SQLite and PostgreSQL do in place
without rewriting the table (no batch copy: the AUTOINCREMENT sequence is never touched on
the way up, and the upgrade costs the same on a store of any size, bar the index, which
starts empty on SQLite and is one scan on PostgreSQL).
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

from app.storage.migrations.sqlite_sequence import keep_sqlite_sequence

revision = "0003_sample_quarantine"
down_revision = "0002_targets_feature_schema"
branch_labels = None
depends_on = None

log = logging.getLogger("skqk.storage")

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTCDateTime = sa.DateTime(timezone=True)
QUARANTINED = "quarantined_at IS NOT NULL"


def upgrade() -> None:
    op.add_column("samples", sa.Column("quarantined_at", UTCDateTime, nullable=True))
    op.add_column("samples", sa.Column("quarantine_audit_id", sa.BigInteger(), nullable=True))
    op.create_index("ix_samples_quarantined", "samples", ["id"],
                    sqlite_where=sa.text(QUARANTINED), postgresql_where=sa.text(QUARANTINED))
    op.create_table(
        "sample_audit",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("affected", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    # The previous schema has no quarantine: its retrains would silently use those rows again.
    bind = op.get_bind()
    quarantined = bind.execute(sa.text(f"SELECT COUNT(*) FROM samples WHERE {QUARANTINED}")).scalar()
    if quarantined:
        raise RuntimeError(f"cannot downgrade below 0003: {quarantined} samples are quarantined; "
                           "release or delete them first (skqk samples release|delete)")
    audited = bind.execute(sa.text("SELECT COUNT(*) FROM sample_audit")).scalar()
    if audited:  # history only: the changes it records (deletions) stay done either way
        log.warning("downgrade below 0003 drops the sample audit trail (%d rows)", audited)
    op.drop_table("sample_audit")
    op.drop_index("ix_samples_quarantined", table_name="samples")
    # reflection loses AUTOINCREMENT: say it again in case batch mode recreates the table
    with keep_sqlite_sequence("samples"), \
            op.batch_alter_table("samples", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_column("quarantine_audit_id")
        batch.drop_column("quarantined_at")
