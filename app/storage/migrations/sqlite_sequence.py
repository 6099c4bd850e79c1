"""Shared by revisions that copy a table in SQLite batch mode (not a revision itself).

Batch mode recreates the table, and the new table's AUTOINCREMENT high-water mark can fall
back to the largest id still present: ids (the data watermark) of deleted rows would repeat.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op


@contextmanager
def keep_sqlite_sequence(table: str) -> Iterator[None]:
    """Restore the table's AUTOINCREMENT high-water mark after batch mode recreated it."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        yield
        return
    query = sa.text("SELECT seq FROM sqlite_sequence WHERE name = :t")
    before = bind.execute(query, {"t": table}).scalar()
    yield
    after = bind.execute(query, {"t": table}).scalar()
    if before is None or (after is not None and after >= before):
        return
    params = {"t": table, "s": before}
    bind.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = :t"), params)
    bind.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :s)"), params)
