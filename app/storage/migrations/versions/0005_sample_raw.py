"""Raw table values beside the encoded features: ``samples.raw``.

Revision ID: 0005_sample_raw
Revises: 0004_sample_counts
Create Date: 2027-01-20

A version whose schema has column types (text categories, booleans, missing values) stores
each sample's features encoded by its encoding (``features``, as for numeric rows, so every
retrain reads them unchanged) and, in ``raw``, the row as it came: a JSON array of the column
values in schema order (numbers, true/false, text, null). Kept so that the encoding can be
re-fitted later from what users sent. NULL for plain numeric rows: such stores are unchanged.

A plain nullable ``ADD COLUMN``: in place on SQLite and PostgreSQL, whatever the table's size.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_sample_raw"
down_revision = "0004_sample_counts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("samples", sa.Column("raw", sa.Text(), nullable=True))


def downgrade() -> None:
    # native DROP COLUMN (SQLite >= 3.35): no table copy, the 0004 triggers stay as they are
    op.drop_column("samples", "raw")
