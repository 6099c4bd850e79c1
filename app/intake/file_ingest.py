"""``skqk ingest FILE``: stream a data file into the samples table, chunk by chunk, exactly once.

Each chunk of ``chunk_rows`` data rows (counted from ``start_row``) is validated against the
active version's feature schema (columns by name for CSV/Parquet, by position for NPZ; class
names or indices; finite numbers; the schema's value ranges unless ``SKQK_INPUT_RANGE=off``)
and committed as one ingest batch. Its idempotency key is made of the file name, its row range
and a digest of its content, so running the same command again after a crash or Ctrl-C skips
every chunk already stored and continues with the first one that is not; a chunk with a bad
row stores nothing, and the error names the row, the column and how to resume.

No torch here: importing a file of any size stays within a small, constant memory budget.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.core.features import FeatureSchema, SchemaError
from app.storage import Store


class FileIngestError(ValueError):
    """A bad row or column stopped the import; the message says what is stored and how to resume."""


@dataclass
class IngestProgress:
    rows_read: int = 0  # data rows handled (stored now or found already stored)
    rows_stored: int = 0  # rows committed by this run
    rows_skipped: int = 0  # rows of chunks a previous run had already stored
    chunks: int = 0
    next_row: int = 1  # the first data row not yet handled
    bytes_read: int | None = None  # CSV: how far into the file (for the ETA)
    total_rows: int | None = None  # Parquet/NPZ: known up front
    started: float = 0.0
    total_samples: int = 0  # store-wide sample count after the last commit
    ended: float | None = None  # set when the import is over: the rate stops moving

    @property
    def rows_per_s(self) -> float:
        """Rows handled per second since the start, up to the last commit (or the end): the bar
        and the summary show the same figure."""
        end = self.ended if self.ended is not None else time.perf_counter()
        return self.rows_read / max(end - self.started, 1e-9)


def ingest_file(store: Store, schema: FeatureSchema, path: Path, label_columns: list[str] | None = None,
                chunk_rows: int = 50_000, start_row: int = 1, check_ranges: bool = True,
                on_chunk: Callable[[IngestProgress], None] | None = None) -> IngestProgress:
    """Import ``path`` into ``store`` under ``schema``; raises FileIngestError on a bad row."""
    from app.intake.files import DataFileError, detect_format, iter_chunks, total_rows

    path = Path(path)
    fmt = detect_format(path)
    labels = label_columns or _schema_labels(schema)
    features = None if fmt == "npz" else list(schema.columns)
    if fmt == "npz" and schema.encoding is not None:
        raise FileIngestError(f"{path}: this model's schema has column types (text, booleans, missing "
                              "values); NPZ holds numbers only: use CSV or Parquet")
    total = total_rows(path)
    progress = IngestProgress(next_row=start_row, started=time.perf_counter(),
                              total_rows=max(total - start_row + 1, 0) if total is not None else None)
    kind = "float" if schema.is_regression else "class"
    label_name = ",".join(labels) if labels else "y"
    try:
        for chunk in iter_chunks(path, labels, features, chunk_rows, start_row, label_kind=kind,
                                 encoding=schema.encoding):
            y = _encode_labels(schema, chunk.labels, chunk.first_row, label_name)
            _check_chunk(schema, chunk.x, chunk.first_row, check_ranges)
            n = chunk.x.shape[0]
            key = chunk_key(f"file:{path.name}", chunk.first_row, chunk.x, y, chunk.raw)
            if schema.is_regression:
                result = store.ingest(chunk.x, idempotency_key=key, targets=y, raw=chunk.raw)
            else:
                result = store.ingest(chunk.x, y, idempotency_key=key, raw=chunk.raw)
            progress.rows_read += n
            if result.duplicate:
                progress.rows_skipped += n
            else:
                progress.rows_stored += n
            progress.chunks += 1
            progress.next_row = chunk.first_row + n
            progress.bytes_read = chunk.bytes_read
            progress.total_samples = result.total_samples
            if on_chunk is not None:
                on_chunk(progress)
    except (DataFileError, SchemaError) as exc:
        raise FileIngestError(_resume_message(str(exc), path, progress, start_row)) from None
    progress.ended = time.perf_counter()
    return progress


def chunk_key(source: str, first_row: int, x: np.ndarray, y: np.ndarray, raw: list[str] | None = None) -> str:
    """Idempotency key of one chunk: readable (source, rows) plus a digest of its content, so a
    re-run skips it and a different file of the same name (tomorrow's drop) is new data."""
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.ascontiguousarray(y).tobytes())
    if raw is not None:  # table rows: two unknown categories encode alike, but are different data
        digest.update("\n".join(raw).encode())
    return f"{source[:120]}:rows{first_row}-{first_row + x.shape[0] - 1}:{digest.hexdigest()[:32]}"


def _schema_labels(schema: FeatureSchema) -> list[str] | None:
    if not schema.label_column:
        return None
    return [c for c in schema.label_column.split(",") if c]


def _encode_labels(schema: FeatureSchema, labels: np.ndarray, first_row: int, column: str) -> np.ndarray:
    if schema.is_regression:
        y = np.asarray(labels, dtype=np.float64).reshape(labels.shape[0], -1)
        if y.shape[1] != schema.num_outputs:
            raise SchemaError(f"the file has {y.shape[1]} target column(s); the model predicts "
                              f"{schema.num_outputs} ({list(schema.target_names)})")
        with np.errstate(over="ignore"):
            y32 = y.astype(np.float32)
        if not np.isfinite(y32).all():
            row = int(np.argwhere(~np.isfinite(y32))[0][0])
            raise SchemaError(f"row {first_row + row}, column {column!r}: target is out of float32 range")
        return y32
    if labels.dtype.kind in "iu":
        y = labels.astype(np.int64)
        bad = (y < 0) | (y >= schema.num_classes)
        if bad.any():
            row = int(np.argmax(bad))
            raise SchemaError(f"row {first_row + row}, column {column!r}: class {int(y[row])} is not in "
                              f"[0, {schema.num_classes - 1}]")
        return y
    if schema.class_names is None:
        raise SchemaError(f"row {first_row}, column {column!r}: this model's classes are integers "
                          f"0..{schema.num_classes - 1}; the file has class names like {str(labels[0])!r}")
    index = {name: i for i, name in enumerate(schema.class_names)}
    text = labels.astype(str)
    y = np.fromiter((index.get(v, -1) for v in text), dtype=np.int64, count=len(text))
    if (y < 0).any():
        row = int(np.argmax(y < 0))
        raise SchemaError(f"row {first_row + row}, column {column!r}: unknown class {str(text[row])!r}; "
                          f"classes are {list(schema.class_names)}")
    return y


def _check_chunk(schema: FeatureSchema, x: np.ndarray, first_row: int, check_ranges: bool) -> None:
    if x.shape[1] != schema.input_dim:
        raise SchemaError(f"row {first_row}: {x.shape[1]} features per row; "
                          f"the model takes {schema.input_dim}")
    if check_ranges:
        bad = schema.out_of_range(x)
        if bad is not None:
            row, col = bad
            raise SchemaError(f"row {first_row + row}, column {schema.feature_names[col]!r}: "
                              f"{schema.range_message(x, row, col)} (SKQK_INPUT_RANGE=off to accept it)")


def _resume_message(error: str, path: Path, progress: IngestProgress, start_row: int) -> str:
    failed_chunk = progress.next_row
    stored = (f"rows {start_row}..{failed_chunk - 1} are stored" if failed_chunk > start_row
              else "nothing of this file was stored by this run")
    return (f"{path}: {error}. Nothing of the chunk starting at row {failed_chunk} was stored; {stored}. "
            f"Fix the file and run the same command again (chunks already stored are skipped), or "
            f"resume with --start-row {failed_chunk}.")
