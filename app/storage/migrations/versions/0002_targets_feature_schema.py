"""Regression samples and per-version feature schemas.

Revision ID: 0002_targets_feature_schema
Revises: 0001_baseline
Create Date: 2026-11-26

- ``samples.label`` becomes nullable (regression rows have no class label);
- ``samples.targets`` (bytes, nullable): regression targets, little-endian float32;
- ``model_versions.feature_schema`` (JSON, nullable): NULL for the versions stored before;
- the index on ``samples.n_features`` goes: no query needs it (samples are read in id order),
  and keeping it up to date cost a third of the time of a bulk file import.

SQLite cannot drop NOT NULL in place, so batch mode copies ``samples`` into a new table;
the copy must keep AUTOINCREMENT and the sequence, or ids (the data watermark) could repeat.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op
from alembic.operations import BatchOperations

from app.storage.migrations.sqlite_sequence import keep_sqlite_sequence

revision = "0002_targets_feature_schema"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


@contextmanager
def batch_alter(table: str) -> Iterator[BatchOperations]:
    # reflection loses AUTOINCREMENT: say it again in case batch mode recreates the table
    with keep_sqlite_sequence(table), \
            op.batch_alter_table(table, table_kwargs={"sqlite_autoincrement": True}) as batch:
        yield batch


def upgrade() -> None:
    with batch_alter("samples") as batch:
        batch.alter_column("label", existing_type=sa.Integer(), nullable=True)
        batch.add_column(sa.Column("targets", sa.LargeBinary(), nullable=True))
        batch.drop_index("ix_samples_n_features")
    with batch_alter("model_versions") as batch:
        batch.add_column(sa.Column("feature_schema", sa.JSON(), nullable=True))


def downgrade() -> None:
    # The previous schema cannot hold a sample without a label: refuse rather than drop data.
    unlabelled = op.get_bind().execute(sa.text("SELECT COUNT(*) FROM samples WHERE label IS NULL")).scalar()
    if unlabelled:
        raise RuntimeError(f"cannot downgrade below 0002: {unlabelled} samples have no label "
                           "(regression rows); delete them first if that is intended")
    with batch_alter("model_versions") as batch:
        batch.drop_column("feature_schema")
    with batch_alter("samples") as batch:
        batch.drop_column("targets")
        batch.alter_column("label", existing_type=sa.Integer(), nullable=False)
        batch.create_index("ix_samples_n_features", ["n_features"])
