"""Users' data files (CSV, Parquet, NPZ) → validated float32 feature chunks + labels.

Everything streams: `iter_chunks` holds about one chunk in memory whatever the file's size,
yields chunks of exactly `chunk_rows` rows (deterministic boundaries: callers derive
idempotency keys from them), and validates each chunk before yielding it, so a bad value
stops the read with a DataFileError naming its 1-based data row and column, and the chunk
holding it is never seen. No torch here: the CLI importing files must stay light.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from app.core.encoding import Encoding
from app.intake.files.base import Chunk, DataFileError, list_columns
from app.intake.files.csv_reader import csv_chunks, csv_header
from app.intake.files.npz_reader import npz_chunks, npz_shape
from app.intake.files.parquet_reader import parquet_chunks, parquet_columns, parquet_rows
from app.intake.files.tables import ColumnPlan, plan_columns

__all__ = [
    "Chunk", "DataFileError", "detect_format", "file_columns", "iter_chunks", "read_columns", "read_table",
    "total_rows",
]

_SUFFIXES = {".csv": "csv", ".csv.gz": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}
_LABEL_KINDS = ("class", "float")
_READ_TABLE_CHUNK = 1 << 16


def detect_format(path: str | os.PathLike[str]) -> str:
    """"csv" | "parquet" | "npz", from the file name's suffix."""
    name = Path(path).name.lower()
    for suffix, fmt in _SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    raise DataFileError(
        f"cannot tell the format of {Path(path).name!r}: supported suffixes are {', '.join(_SUFFIXES)}"
    )


def file_columns(path: str | os.PathLike[str]) -> list[str] | None:
    """Column names in file order; None for NPZ (its columns are positions)."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "csv":
        return csv_header(p)
    if fmt == "parquet":
        return parquet_columns(p)
    return None


def total_rows(path: str | os.PathLike[str]) -> int | None:
    """Data rows, where the file says so cheaply (Parquet metadata, NPZ header); None for CSV."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "parquet":
        return parquet_rows(p)
    if fmt == "npz":
        return npz_shape(p)[0]
    return None


def iter_chunks(
    path: str | os.PathLike[str],
    label_columns: list[str] | None,
    feature_columns: list[str] | None = None,
    chunk_rows: int = 50_000,
    start_row: int = 1,
    label_kind: str = "class",
    encoding: Encoding | None = None,
) -> Iterator[Chunk]:
    """Validated chunks of rows start_row, start_row + chunk_rows, … (1-based data rows).

    CSV/Parquet: labels from `label_columns` (several only for label_kind="float"), features
    from `feature_columns` in that order, else every other column in file order.
    NPZ: arrays x and y; the column arguments are ignored.
    """
    _check_args(chunk_rows, start_row, label_kind)
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "npz":
        return npz_chunks(p, chunk_rows, start_row, label_kind)
    plan = _plan(p, fmt, label_columns, feature_columns, label_kind)
    if encoding is not None:  # a table with column types: chunks carry the encoded rows and raw values
        plan = replace(plan, typed=True, encoding=encoding)
    reader = csv_chunks if fmt == "csv" else parquet_chunks
    return reader(p, plan, chunk_rows, start_row)


def iter_scoring_chunks(
    path: str | os.PathLike[str], features: list[str] | None, encoding: Encoding | None, keep: list[str],
    chunk_rows: int = 50_000,
) -> Iterator[Chunk]:
    """Chunks of a file to score: the features (by name; NPZ: x by position), no labels, and the
    ``keep`` columns as read (``Chunk.kept``). Typed (``encoding``): rows come encoded."""
    _check_args(chunk_rows, 1, "class")
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "npz":
        if keep:
            raise DataFileError("--keep: an NPZ file has no named columns to keep")
        return npz_chunks(p, chunk_rows, 1, "class")
    columns = csv_header(p) if fmt == "csv" else parquet_columns(p)
    names = list(features or [])
    for c in [*names, *keep]:
        if c not in columns:
            raise DataFileError(f"no such column; the file's columns are: {list_columns(columns)}", column=c)
    order = {c: columns.index(c) for c in [*names, *keep]}
    plan = ColumnPlan(names, [], "class", order, typed=encoding is not None, encoding=encoding,
                      keep=tuple(keep))
    reader = csv_chunks if fmt == "csv" else parquet_chunks
    return reader(p, plan, chunk_rows, 1)


def read_columns(
    path: str | os.PathLike[str], label_columns: list[str] | None, feature_columns: list[str] | None = None,
    label_kind: str = "class",
) -> tuple[list[str], list[pa.ChunkedArray], np.ndarray]:
    """A CSV/Parquet file's feature columns as read (text for CSV), for type inference; and labels."""
    _check_args(1, 1, label_kind)
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "npz":
        raise DataFileError("NPZ files hold numbers only: no column types to infer")
    plan = replace(_plan(p, fmt, label_columns, feature_columns, label_kind), typed=True)
    reader = csv_chunks if fmt == "csv" else parquet_chunks
    parts: list[list[pa.ChunkedArray]] = [[] for _ in plan.features]
    ys = []
    for chunk in reader(p, plan, _READ_TABLE_CHUNK, 1):
        assert chunk.columns is not None
        for j, col in enumerate(chunk.columns):
            parts[j].extend(col.chunks)
        ys.append(chunk.labels)
    cols = [pa.chunked_array(chunks) if chunks else pa.chunked_array([], type=pa.string())
            for chunks in parts]
    labels = np.concatenate(ys) if ys else np.empty(0, np.int64)
    return list(plan.features), cols, labels


def read_table(
    path: str | os.PathLike[str],
    label_columns: list[str] | None,
    feature_columns: list[str] | None = None,
    label_kind: str = "class",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The whole file: (x float32 [N, D], labels, feature names); NPZ features are f0 … f{D-1}."""
    _check_args(1, 1, label_kind)
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "npz":
        _, n_features, targets = npz_shape(p)
        names = [f"f{j}" for j in range(n_features)]
        chunks = npz_chunks(p, _READ_TABLE_CHUNK, 1, label_kind)
    else:
        plan = _plan(p, fmt, label_columns, feature_columns, label_kind)
        names, targets = list(plan.features), len(plan.labels)
        reader = csv_chunks if fmt == "csv" else parquet_chunks
        chunks = reader(p, plan, _READ_TABLE_CHUNK, 1)
    xs, ys = [], []
    for chunk in chunks:
        xs.append(chunk.x)
        ys.append(chunk.labels)
    if not xs:
        empty_labels = np.empty(0, np.int64) if label_kind == "class" else np.empty((0, targets))
        return np.empty((0, len(names)), np.float32), empty_labels, names
    return np.concatenate(xs), np.concatenate(ys), names


def _check_args(chunk_rows: int, start_row: int, label_kind: str) -> None:
    if chunk_rows < 1 or start_row < 1:
        raise ValueError(f"chunk_rows and start_row must be >= 1, got {chunk_rows} and {start_row}")
    if label_kind not in _LABEL_KINDS:
        raise ValueError(f"label_kind must be one of {_LABEL_KINDS}, got {label_kind!r}")


def _plan(
    p: Path, fmt: str, label_columns: list[str] | None, feature_columns: list[str] | None, label_kind: str
) -> ColumnPlan:
    columns = csv_header(p) if fmt == "csv" else parquet_columns(p)
    return plan_columns(columns, label_columns, feature_columns, label_kind)
