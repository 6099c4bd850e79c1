"""Archive stored samples to Parquet (retention: what falls out of the window can be kept cold).

Every stored row with ``id ≤ to_id`` (quarantined ones included: an archive is a record of
what was stored) is written in id order, in row groups of ``chunk_rows`` read by keyset
pagination, so memory stays bounded whatever the table size. Columns: ``id``, ``batch_id``,
``created_at`` (UTC), ``n_features``, ``label`` (null for regression rows), ``targets`` and
``features`` (lists of float32, the stored values bit for bit), ``quarantined_at``. Needs the
``files`` extra (pyarrow).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import select

from app.storage.schema import samples
from app.storage.store import Store, as_utc


def _floats(blobs: list[bytes | None]) -> object:
    import pyarrow as pa

    lengths = np.fromiter((0 if b is None else len(b) // 4 for b in blobs), dtype=np.int32,
                          count=len(blobs))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
    values = np.frombuffer(b"".join(b for b in blobs if b is not None), dtype="<f4")
    mask = pa.array([b is None for b in blobs])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32()), mask=mask)


def archive_samples(store: Store, to_id: int, path: Path, chunk_rows: int = 50_000) -> int:
    """Write every stored row with id ≤ ``to_id`` to the Parquet file ``path``; the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    utc = pa.timestamp("us", "UTC")
    schema = pa.schema([("id", pa.int64()), ("batch_id", pa.int64()), ("created_at", utc),
                        ("n_features", pa.int32()), ("label", pa.int64()),
                        ("targets", pa.list_(pa.float32())), ("features", pa.list_(pa.float32())),
                        ("quarantined_at", utc)])
    cols = [samples.c.id, samples.c.batch_id, samples.c.created_at, samples.c.n_features,
            samples.c.label, samples.c.targets, samples.c.features, samples.c.quarantined_at]
    tmp = path.with_name(f".{path.name}.tmp")
    written, last = 0, 0
    with pq.ParquetWriter(tmp, schema) as writer:
        while True:
            with store.engine.connect() as conn:
                rows = conn.execute(select(*cols).where(samples.c.id > last, samples.c.id <= to_id)
                                    .order_by(samples.c.id).limit(chunk_rows)).all()
            if not rows:
                break
            last = int(rows[-1][0])
            table = pa.table({
                "id": pa.array([r[0] for r in rows], pa.int64()),
                "batch_id": pa.array([r[1] for r in rows], pa.int64()),
                "created_at": pa.array([as_utc(r[2]) for r in rows], pa.timestamp("us", "UTC")),
                "n_features": pa.array([r[3] for r in rows], pa.int32()),
                "label": pa.array([r[4] for r in rows], pa.int64()),
                "targets": _floats([r[5] for r in rows]),
                "features": _floats([r[6] for r in rows]),
                "quarantined_at": pa.array([as_utc(r[7]) for r in rows], pa.timestamp("us", "UTC")),
            }, schema=schema)
            writer.write_table(table)
            written += len(rows)
    tmp.replace(path)  # a complete file or none
    return written
