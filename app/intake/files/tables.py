"""What CSV and Parquet share: which columns to read, fixed-size chunks, a chunk's validation."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from app.core.encoding import Encoding, raw_json_rows
from app.intake.files.base import BadValue, Chunk, DataFileError, first_bad, list_columns
from app.intake.files.columns import IntGuess, class_labels, float_matrix


@dataclass(frozen=True)
class ColumnPlan:
    features: list[str]  # in output order
    labels: list[str]
    label_kind: str  # "class" | "float"
    order: dict[str, int]  # position in the file: the leftmost bad value of a row is reported
    typed: bool = False  # a table with column types (text, booleans, missing values)
    encoding: Encoding | None = None  # typed: encode with this; None: hand the columns back as read
    keep: tuple[str, ...] = ()  # scoring: columns handed back as read (ids, keys), beside the rows

    @property
    def columns(self) -> list[str]:
        cols = [*self.features, *self.labels]
        return cols + [c for c in self.keep if c not in cols]


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
    if plan.typed:
        return _typed_chunk(table, plan, guess, first_row, bytes_read)
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
    return Chunk(first_row=first_row, x=x, labels=labels, bytes_read=bytes_read, kept=_kept(table, plan))


def _kept(table: pa.Table, plan: ColumnPlan) -> pa.Table | None:
    if not plan.keep:
        return None
    kept = table.select(list(plan.keep))
    for i, f in enumerate(kept.schema):  # a kept feature read as bytes (typed CSV) goes out as text
        if pa.types.is_binary(f.type):
            with contextlib.suppress(pa.ArrowInvalid):  # not UTF-8: keep the bytes
                kept = kept.set_column(i, f.name, kept.column(i).cast(pa.string()))
    return kept


def _labels(table: pa.Table, plan: ColumnPlan, guess: IntGuess | None) -> np.ndarray:
    if not plan.labels:  # scoring a file: no labels to read
        return np.zeros(table.num_rows, np.int64)
    if plan.label_kind == "class":
        name = plan.labels[0]
        return class_labels(table.column(name), name, plan.order[name], guess)
    cols = [table.column(c) for c in plan.labels]
    return float_matrix(cols, plan.labels, [plan.order[c] for c in plan.labels], np.float64)


def _typed_chunk(table: pa.Table, plan: ColumnPlan, guess: IntGuess | None, first_row: int,
                 bytes_read: int | None) -> Chunk:
    """A table with column types: parsed per type and encoded (or, without an encoding yet, the
    feature columns as read, for type inference at init)."""
    from app.intake.files.typed import parse_arrow

    labels = parsed = None
    bad_x = bad_y = None
    enc = plan.encoding
    if enc is not None:
        try:
            parsed = [parse_arrow(table.column(c), k, c, plan.order[c])
                      for c, k in zip(plan.features, enc.kinds, strict=True)]
        except BadValue as b:
            bad_x = b
    try:
        labels = _labels(table, plan, guess)
    except BadValue as b:
        bad_y = b
    bad = first_bad(bad_x, bad_y)
    if bad is not None:
        raise bad.at(first_row)
    assert labels is not None
    if enc is None:
        return Chunk(first_row, np.empty((table.num_rows, 0), np.float32), labels, bytes_read,
                     columns=[table.column(c) for c in plan.features])
    assert parsed is not None
    x, unknown = enc.encode(parsed)  # unknown categories are stored as they came
    return Chunk(first_row, x, labels, bytes_read, raw=raw_json_rows(enc.kinds, parsed),
                 kept=_kept(table, plan), unknown={enc.names[j]: int(rows.sum()) for j, rows in unknown})
