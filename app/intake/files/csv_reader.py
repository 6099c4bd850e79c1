"""Streaming CSV (optionally gzip) through pyarrow, with exact data-row numbers in every error.

Row numbers: the parser runs single-threaded (on 2 cores threads bought nothing, and only then
does pyarrow number the rows it rejects), blank lines are rows (so a line's number is its data
row + 1), and rows with the wrong field count are dropped and remembered: every row before the
first dropped one is numbered right, and no chunk reaching a dropped row is yielded.
Numbers are read as float64 straight away; when pyarrow rejects a value it cannot say where,
so the reader starts again at the current chunk, reading every column as text, and finds it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv

from app.intake.files.base import Chunk, DataFileError, describe
from app.intake.files.columns import IntGuess
from app.intake.files.tables import ColumnPlan, rechunk, table_chunk

CSV_BLOCK_SIZE = 1 << 20  # bytes parsed at a time: 4 MiB was no faster and doubled peak RSS; tests shrink it


class _Retry(Exception):
    """pyarrow rejected a value of the block it just read without saying which."""


@dataclass
class _Dropped:
    """Rows the parser dropped for having the wrong number of fields, by data row."""

    reasons: dict[int, str] = field(default_factory=dict)
    unnumbered: str | None = None

    def handler(self, row: pacsv.InvalidRow) -> str:
        reason = f"expected {row.expected_columns} fields, got {row.actual_columns}: {describe(row.text)}"
        if row.number is None:  # only a multi-threaded parser leaves it out
            self.unnumbered = reason
        else:
            self.reasons.setdefault(row.number - 1, reason)  # number counts the header line
        return "skip"

    def first_from(self, row: int) -> int | None:
        if self.unnumbered is not None:
            raise DataFileError(f"a row has the wrong number of fields ({self.unnumbered})")
        return min((r for r in self.reasons if r >= row), default=None)


def csv_header(path: Path) -> list[str]:
    with _opened(path) as (_, stream):
        reader = _reader(stream, None, 1, _Dropped())
        return list(reader.schema.names)


def csv_chunks(path: Path, plan: ColumnPlan, chunk_rows: int, start_row: int) -> Iterator[Chunk]:
    pos = [start_row]  # first row of the chunk not yet yielded, kept across the retry
    guess = IntGuess()
    try:
        yield from _pass(path, plan, chunk_rows, pos, guess, text=False)
    except _Retry:
        yield from _pass(path, plan, chunk_rows, pos, guess, text=True)


def _pass(
    path: Path, plan: ColumnPlan, chunk_rows: int, pos: list[int], guess: IntGuess, text: bool
) -> Iterator[Chunk]:
    dropped = _Dropped()
    with _opened(path) as (raw, stream):
        try:
            reader = _reader(stream, _types(plan, text), pos[0], dropped)
        except pa.ArrowInvalid as e:
            raise _failure(e, text) from e
        for table in rechunk(_batches(reader, text), chunk_rows):
            _stop_at_dropped(dropped, pos[0], pos[0] + chunk_rows, table, plan, guess)
            chunk = table_chunk(table, plan, guess, pos[0], raw.tell())
            pos[0] += table.num_rows
            yield chunk
        _stop_at_dropped(dropped, pos[0], None, None, plan, guess)  # the file ends with dropped rows


def _stop_at_dropped(
    dropped: _Dropped, first_row: int, end_row: int | None, table: pa.Table | None, plan: ColumnPlan,
    guess: IntGuess,
) -> None:
    """Raise if the chunk [first_row, end_row) reaches a dropped row (or has a bad value before it)."""
    bad = dropped.first_from(first_row)
    if bad is None or (end_row is not None and bad >= end_row):
        return
    if table is not None and bad > first_row:  # rows before `bad` are numbered right: check them first
        table_chunk(table.slice(0, bad - first_row), plan, guess, first_row, None)
    raise DataFileError(dropped.reasons[bad], row=bad)


def _types(plan: ColumnPlan, text: bool) -> dict[str, pa.DataType]:
    # labels for classes stay text (ints or strings, decided later); binary: bad UTF-8 is ours to find
    number = pa.binary() if text else pa.float64()
    # typed tables: every feature as text, parsed per column type (missing words, booleans, text)
    types = {c: pa.binary() if plan.typed else number for c in plan.features}
    for c in plan.labels:
        types[c] = pa.binary() if plan.label_kind == "class" else number
    for c in plan.keep:  # kept as text, exactly as in the file
        types.setdefault(c, pa.string())
    return types


def _reader(
    stream: BinaryIO | pa.NativeFile, types: dict[str, pa.DataType] | None, first_row: int, dropped: _Dropped
) -> pacsv.CSVStreamingReader:
    return pacsv.open_csv(
        stream,
        read_options=pacsv.ReadOptions(
            use_threads=False, block_size=CSV_BLOCK_SIZE, skip_rows_after_names=first_row - 1
        ),
        parse_options=pacsv.ParseOptions(ignore_empty_lines=False, invalid_row_handler=dropped.handler),
        convert_options=pacsv.ConvertOptions(
            include_columns=list(types) if types else None,
            column_types=types,
            null_values=[""],  # not "NA"/"NaN"/…: those are reported as what they are
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    )


def _batches(reader: pacsv.CSVStreamingReader, text: bool) -> Iterator[pa.RecordBatch]:
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as e:
            raise _failure(e, text) from e
        yield batch


def _failure(e: pa.ArrowInvalid, text: bool) -> Exception:
    """Read as numbers: retry as text, which finds the bad value. Read as text: nothing to find."""
    return DataFileError(f"cannot read the CSV file: {e}") if text else _Retry()


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[tuple[BinaryIO, BinaryIO | pa.NativeFile]]:
    """The raw file (its position is the progress) and the stream pyarrow parses."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed below, after the stream
    except OSError as e:
        raise DataFileError(f"cannot open {path}: {e.strerror}") from e
    with raw:
        gz = path.name.lower().endswith(".gz")
        stream = pa.CompressedInputStream(raw, "gzip") if gz else raw
        try:
            yield raw, stream
        except (OSError, pa.ArrowException) as e:
            raise DataFileError(f"cannot read {path.name}: {e}") from e
