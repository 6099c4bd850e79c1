"""Streaming Parquet: only the needed columns, from the row group that holds the start row."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from app.intake.files.base import Chunk, DataFileError
from app.intake.files.columns import check_type
from app.intake.files.tables import ColumnPlan, drop_rows, rechunk, table_chunk

_MAX_BATCH = 1 << 16  # rows per decoded batch; chunks are assembled from these
# Stream column chunks through small buffers instead of loading whole row groups: files written
# with the defaults have 1M-row groups, hundreds of MB each.
_READ_BUFFER = 1 << 16


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, buffer_size=_READ_BUFFER, pre_buffer=False)
    except FileNotFoundError as e:
        raise DataFileError(f"cannot open {path}: no such file") from e
    except (OSError, pa.ArrowException) as e:
        raise DataFileError(f"cannot read {path.name} as Parquet: {e}") from e


def parquet_columns(path: Path) -> list[str]:
    return list(open_parquet(path).schema_arrow.names)


def parquet_rows(path: Path) -> int:
    return open_parquet(path).metadata.num_rows


def parquet_chunks(path: Path, plan: ColumnPlan, chunk_rows: int, start_row: int) -> Iterator[Chunk]:
    pf = open_parquet(path)
    _check_types(pf.schema_arrow, plan)
    groups, skip = _groups_from(pf.metadata, start_row - 1)
    if not groups:
        return
    batches = pf.iter_batches(
        batch_size=min(chunk_rows, _MAX_BATCH), row_groups=groups, columns=plan.columns
    )
    row = start_row
    try:
        for table in rechunk(drop_rows(batches, skip), chunk_rows):
            chunk = table_chunk(table, plan, None, row, None)
            row += table.num_rows
            yield chunk
    except (OSError, pa.ArrowException) as e:  # corrupt pages: nothing to point at but the file
        raise DataFileError(f"cannot read {path.name} near row {row}: {e}") from e


def _check_types(schema: pa.Schema, plan: ColumnPlan) -> None:
    for c in plan.features:
        check_type(c, schema.field(c).type, "features")
    for c in plan.labels:
        check_type(c, schema.field(c).type, "labels")


def _groups_from(meta: pq.FileMetaData, skip: int) -> tuple[list[int], int]:
    """Row groups from the one holding 0-based row `skip`, and how many of its rows to drop."""
    first = 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if skip < first + n:
            return list(range(g, meta.num_row_groups)), skip - first
        first += n
    return [], 0
