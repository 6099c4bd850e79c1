"""The types every reader shares: the error users see and the chunk the caller stores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_MAX_LISTED = 100  # column lists in messages stop here: a 10,000-column header is no help


class DataFileError(ValueError):
    """A problem with a user's data file; says which data row (1-based) and column where known."""

    def __init__(self, reason: str, row: int | None = None, column: str | None = None) -> None:
        self.reason = reason
        self.row = row
        self.column = column
        super().__init__(_format(reason, row, column))


def _format(reason: str, row: int | None, column: str | None) -> str:
    where = []
    if row is not None:
        where.append(f"row {row}")
    if column is not None:
        where.append(f"column {column!r}")
    return f"{', '.join(where)}: {reason}" if where else reason


def list_columns(names: list[str]) -> str:
    """Names for an error message, cut short on very wide files."""
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f", … ({more} more)" if more > 0 else "")


@dataclass
class Chunk:
    """Validated rows first_row .. first_row + len(x) - 1 of a data file (1-based data rows)."""

    first_row: int
    x: np.ndarray  # float32 [n, D], all finite
    labels: np.ndarray  # class: int64 or str [n]; float: float64 [n, T], all finite
    bytes_read: int | None  # CSV only: file bytes consumed so far, for progress / ETA
    raw: list[str] | None = None  # typed tables: each row's values as a JSON array (what is stored)
    columns: list[Any] | None = None  # typed tables read to infer types: the feature columns (pyarrow)
    kept: Any = None  # scoring: a pyarrow Table of the columns asked to be kept, as read
    unknown: dict[str, int] | None = None  # typed: per column, values outside its vocabulary


class BadValue(Exception):
    """The first bad value found in a chunk, before it becomes a DataFileError with a row number.

    `offset` is 0-based within the chunk; `order` breaks ties between columns of one row
    (the column's position in the file), so the leftmost bad value of the first bad row wins.
    """

    def __init__(self, offset: int, order: int, column: str | None, reason: str) -> None:
        super().__init__(reason)
        self.offset = offset
        self.order = order
        self.column = column
        self.reason = reason

    def at(self, first_row: int) -> DataFileError:
        return DataFileError(self.reason, row=first_row + self.offset, column=self.column)


def first_bad(*found: BadValue | None) -> BadValue | None:
    """The earliest of several findings (by row, then column position)."""
    real = [b for b in found if b is not None]
    return min(real, key=lambda b: (b.offset, b.order)) if real else None


def describe(value: object) -> str:
    """A user's raw value for a message, short and quoted."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value)
    return repr(text if len(text) <= 40 else text[:37] + "...")
