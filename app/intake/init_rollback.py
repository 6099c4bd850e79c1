"""``skqk init`` (and a server's bootstrap) is one unit: all or nothing.

Version 1's rows must be stored before it is trained (the stable split depends on their ids),
so a failure after that point (too few holdout rows, an architecture that does not fit, a
training error, Ctrl-C) would leave them behind as orphans that later retrains train on.
:func:`discard_batches` takes them back: the rows *and* their ingest batch rows (so running
the same init again stores them again instead of finding its chunk keys already used), in one
transaction, with a ``delete`` entry per batch in the sample audit trail saying why. Only the
batches this run created are discarded; chunks some earlier run stored stay.
"""

from __future__ import annotations

import logging

from sqlalchemy import delete

from app.storage import Store
from app.storage.sample_admin import SampleSelection, apply_action
from app.storage.schema import ingest_batches

log = logging.getLogger("skqk.bootstrap")


def discard_batches(store: Store, batch_ids: list[int], why: str) -> int:
    """Delete the rows of ``batch_ids`` and the batches themselves; the number of rows deleted."""
    if not batch_ids:
        return 0
    deleted = 0
    with store.engine.begin() as conn:
        for batch_id in batch_ids:
            deleted += apply_action(conn, "delete", SampleSelection(batch_id=batch_id), "init",
                                    f"init failed, its rows taken back: {why}"[:1000]).affected
            conn.execute(delete(ingest_batches).where(ingest_batches.c.id == batch_id))
    log.warning("init failed (%s): its %d stored rows (%d batches) were removed again", why, deleted,
                len(batch_ids))
    return deleted
