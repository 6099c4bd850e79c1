"""What CSV and Parquet share: which columns to read, fixed-size chunks, a chunk's validation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from app.intake.files.base import BadValue, Chunk, DataFileError, first_bad, list_columns
from app.intake.files.columns import IntGuess, class_labels, float_matrix


@dataclass(frozen=True)
class ColumnPlan:
    features: list[str]  # in output order
    labels: list[str]
    label_kind: str  # "class" | "float"
    order: dict[str, int]  # position in the file: the leftmost bad value of a row is reported

    @property
    def columns(self) -> list[str]:
        return [*self.features, *self.labels]


def plan_columns(
    file_columns: list[str], label_columns: list[str] | None, feature_columns: list[str] | None,
    label_kind: str,
) -> ColumnPlan:
    """Check the caller's column choice against the file's header; features default to the rest."""
    labels = list(label_columns or [])
    if not labels:
        raise DataFileError("no label column given; name the column(s) that hold the labels")
    if label_kind == "class" and len(labels) > 1:
        raise DataFileError(f"class labels come from one column, got {len(labels)}: {list_columns(labels)}")
    features = list(feature_columns) if feature_columns is not None else [
        c for c in file_columns if c not in labels
    ]
    _check_names(file_columns, labels, features)
    if not features:
        raise DataFileError("no feature columns: the file has only the label column(s)")
    order = {c: file_columns.index(c) for c in [*features, *labels]}
    return ColumnPlan(features, labels, label_kind, order)


def _check_names(file_columns: list[str], labels: list[str], features: list[str]) -> None:
    both = [c for c in features if c in labels]
    if both:
        raise DataFileError("is both a label and a feature column", column=both[0])
    asked = Counter([*labels, *features])
    twice = [c for c, k in asked.items() if k > 1]
    if twice:
        raise DataFileError("is named twice", column=twice[0])
    for c in asked:
        if c not in file_columns:
            listed = list_columns(file_columns)
            raise DataFileError(f"no such column; the file's columns are: {listed}", column=c)
    in_file = Counter(file_columns)
    dup = [c for c in asked if in_file[c] > 1]
    if dup:
        raise DataFileError("the file has several columns of this name", column=dup[0])


def rechunk(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly `rows` rows (the last one fewer), whatever sizes the batches come in."""
    pending: list[pa.RecordBatch] = []
    have = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        have += batch.num_rows
        while have >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            pending = table.slice(rows).to_batches()  # zero-copy views of the rest
            have -= rows
    if have:
        yield pa.Table.from_batches(pending)


def drop_rows(batches: Iterable[pa.RecordBatch], n: int) -> Iterator[pa.RecordBatch]:
    """The batches without their first n rows."""
    for batch in batches:
        if n >= batch.num_rows:
            n -= batch.num_rows
            continue
        yield batch.slice(n) if n else batch
        n = 0


def table_chunk(
    table: pa.Table, plan: ColumnPlan, guess: IntGuess | None, first_row: int, bytes_read: int | None
) -> Chunk:
    """Validate and convert one chunk; raise DataFileError at its first bad value (row, then column)."""
    x = labels = None
    bad_x = bad_y = None
    try:
        x = float_matrix(
            [table.column(c) for c in plan.features], plan.features, [plan.order[c] for c in plan.features],
            np.float32,
        )
    except BadValue as b:
        bad_x = b
    try:
        labels = _labels(table, plan, guess)
    except BadValue as b:
        bad_y = b
    bad = first_bad(bad_x, bad_y)
    if bad is not None:
        raise bad.at(first_row)
    assert x is not None and labels is not None
    return Chunk(first_row=first_row, x=x, labels=labels, bytes_read=bytes_read)


def _labels(table: pa.Table, plan: ColumnPlan, guess: IntGuess | None) -> np.ndarray:
    if plan.label_kind == "class":
        name = plan.labels[0]
        return class_labels(table.column(name), name, plan.order[name], guess)
    cols = [table.column(c) for c in plan.labels]
    return float_matrix(cols, plan.labels, [plan.order[c] for c in plan.labels], np.float64)
