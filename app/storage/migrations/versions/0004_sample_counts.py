"""An exact sample count that costs no table scan: ``sample_counts``, kept by triggers.

Revision ID: 0004_sample_counts
Revises: 0003_sample_quarantine
Create Date: 2027-01-10

``/ingest`` answers ``total_samples`` (the samples retrains use: stored and not quarantined),
and counting them with ``count(*)`` scans an index of the whole table on every request
(about 6 ms of every one-row ``/ingest`` at 1 M rows on SQLite, growing with the table;
docs/OPERATIONS.md). This revision keeps the
number in ``sample_counts`` instead: 16 rows (``slot``, ``n``), whose sum is the count.

The database keeps it, in the transaction of every change, whoever makes the change (this
release, an older replica still running during a rolling upgrade, a hand-written SQL fix):

- ``AFTER INSERT ON ingest_batches``: ``+ NEW.count`` (one per ingest: every sample comes in a
  batch whose ``count`` is its number of rows, in the same transaction; new rows are never
  quarantined), into slot ``batch id % 16`` so that concurrent ingests on PostgreSQL lock
  different rows;
- ``AFTER DELETE ON samples``: ``−`` the deleted rows that were not quarantined;
- ``AFTER UPDATE ON samples``: ``±`` the rows whose ``quarantined_at`` went from NULL to set
  (quarantine) or back (release).

PostgreSQL runs the two ``samples`` triggers once per statement over its transition tables
(a quarantine of a million rows is one ``UPDATE`` of the counter); SQLite has only row
triggers, which cost about 1–3 µs per deleted or (un)quarantined row; ingest pays one counter
update per batch on both.

The upgrade creates the triggers first, then counts the existing rows: on PostgreSQL
creating a trigger waits for ingests in flight and holds new ones off until the upgrade
commits, so no row is counted twice or missed; SQLite's upgrade holds the write lock anyway.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_sample_counts"
down_revision = "0003_sample_quarantine"
branch_labels = None
depends_on = None

SLOTS = 16

SQLITE_TRIGGERS = (
    f"""CREATE TRIGGER skqk_count_ingest AFTER INSERT ON ingest_batches
    BEGIN UPDATE sample_counts SET n = n + NEW.count WHERE slot = NEW.id % {SLOTS}; END""",
    f"""CREATE TRIGGER skqk_count_delete AFTER DELETE ON samples WHEN OLD.quarantined_at IS NULL
    BEGIN UPDATE sample_counts SET n = n - 1 WHERE slot = OLD.id % {SLOTS}; END""",
    f"""CREATE TRIGGER skqk_count_quarantine AFTER UPDATE OF quarantined_at ON samples
    WHEN (OLD.quarantined_at IS NULL) <> (NEW.quarantined_at IS NULL)
    BEGIN UPDATE sample_counts SET n = n + (CASE WHEN NEW.quarantined_at IS NULL THEN 1 ELSE -1 END)
          WHERE slot = OLD.id % {SLOTS}; END""",
)

PG_FUNCTIONS = (
    f"""CREATE OR REPLACE FUNCTION skqk_count_ingest() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE sample_counts SET n = n + NEW.count WHERE slot = mod(NEW.id, {SLOTS});
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION skqk_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE delta bigint;
    BEGIN
        SELECT count(*) INTO delta FROM skqk_old WHERE quarantined_at IS NULL;
        IF delta <> 0 THEN
            UPDATE sample_counts SET n = n - delta WHERE slot = 0;
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION skqk_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE delta bigint;
    BEGIN
        SELECT (SELECT count(*) FROM skqk_new WHERE quarantined_at IS NULL)
             - (SELECT count(*) FROM skqk_old WHERE quarantined_at IS NULL) INTO delta;
        IF delta <> 0 THEN
            UPDATE sample_counts SET n = n + delta WHERE slot = 0;
        END IF;
        RETURN NULL;
    END $$""",
)
PG_TRIGGERS = (
    """CREATE TRIGGER skqk_count_ingest AFTER INSERT ON ingest_batches
    FOR EACH ROW EXECUTE FUNCTION skqk_count_ingest()""",
    """CREATE TRIGGER skqk_count_delete AFTER DELETE ON samples REFERENCING OLD TABLE AS skqk_old
    FOR EACH STATEMENT EXECUTE FUNCTION skqk_count_delete()""",
    # a trigger with transition tables cannot name columns: any UPDATE, the delta says what changed
    """CREATE TRIGGER skqk_count_update AFTER UPDATE ON samples
    REFERENCING OLD TABLE AS skqk_old NEW TABLE AS skqk_new
    FOR EACH STATEMENT EXECUTE FUNCTION skqk_count_update()""",
)
TRIGGERS = {"skqk_count_ingest": "ingest_batches", "skqk_count_delete": "samples",
            "skqk_count_quarantine": "samples", "skqk_count_update": "samples"}


def upgrade() -> None:
    op.create_table(
        "sample_counts",
        sa.Column("slot", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
    )
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for sql in (*PG_FUNCTIONS, *PG_TRIGGERS):
            bind.exec_driver_sql(sql)
    elif bind.dialect.name == "sqlite":
        for sql in SQLITE_TRIGGERS:
            bind.exec_driver_sql(sql)
    else:
        raise RuntimeError(f"0004_sample_counts: no triggers written for {bind.dialect.name}")
    # after the triggers (see the module doc): every row is counted exactly once
    bind.execute(sa.text("INSERT INTO sample_counts (slot, n) "
                         "SELECT 0, count(*) FROM samples WHERE quarantined_at IS NULL"))
    for slot in range(1, SLOTS):
        bind.execute(sa.text("INSERT INTO sample_counts (slot, n) VALUES (:slot, 0)"), {"slot": slot})


def downgrade() -> None:
    bind = op.get_bind()
    postgres = bind.dialect.name == "postgresql"
    for name, table in TRIGGERS.items():
        bind.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}" + (f" ON {table}" if postgres else ""))
    if postgres:
        for name in ("skqk_count_ingest", "skqk_count_delete", "skqk_count_update"):
            bind.exec_driver_sql(f"DROP FUNCTION IF EXISTS {name}()")
    op.drop_table("sample_counts")
