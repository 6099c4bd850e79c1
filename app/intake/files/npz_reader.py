"""Streaming NPZ: `x` [N, ...] (flattened to [N, D]) and `y` [N] or [N, T], read in row blocks.

Each member is opened as a zip stream and its .npy header parsed, so rows come straight off
the (possibly deflated) stream: memory holds one chunk, never the arrays.
"""

from __future__ import annotations

import contextlib
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import numpy.lib.format as npy

from app.intake.files.base import BadValue, Chunk, DataFileError, first_bad

_F32_MAX = float(np.finfo(np.float32).max)


class _NpyStream:
    """Rows of one .npy member of an open zip file."""

    def __init__(self, zf: zipfile.ZipFile, name: str) -> None:
        self.name = name
        member = _member(zf, name)
        self.fp: IO[bytes] = zf.open(member)
        self.shape, self.dtype = _header(self.fp, member)
        self.data_start = self.fp.tell()
        self.rows = self.shape[0]
        self.width = math.prod(self.shape[1:])  # values per row once flattened
        self.row_bytes = self.width * self.dtype.itemsize

    def seek_row(self, row: int) -> None:
        """Go to 0-based row `row` (a deflated member decompresses up to it, in small steps)."""
        self.fp.seek(self.data_start + row * self.row_bytes)

    def read(self, n: int, first_row: int) -> np.ndarray:
        buf = self.fp.read(n * self.row_bytes)
        if len(buf) != n * self.row_bytes:
            raise DataFileError(f"{self.name}.npy ends early (truncated file?)", row=first_row)
        return np.frombuffer(buf, self.dtype).reshape(n, self.width)

    def close(self) -> None:
        self.fp.close()


def _member(zf: zipfile.ZipFile, name: str) -> str:
    names = zf.namelist()
    for candidate in (f"{name}.npy", name):
        if candidate in names:
            return candidate
    raise DataFileError(f"the NPZ file has no array {name!r}; it has: {', '.join(names) or 'nothing'}")


def _header(fp: IO[bytes], member: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = npy.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as e:
        raise DataFileError(f"{member} is not a readable .npy array: {e}") from e
    if dtype.hasobject or dtype.kind not in "biufUS":
        raise DataFileError(f"{member} holds {dtype} values; only numbers (and text labels) can be read")
    if not shape:
        raise DataFileError(f"{member} is a scalar, not an array of rows")
    if fortran and len(shape) > 1:  # rows are not contiguous: cannot be streamed
        raise DataFileError(f"{member} is stored in Fortran order; save it with np.ascontiguousarray(...)")
    return shape, dtype


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[tuple[_NpyStream, _NpyStream]]:
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError as e:
        raise DataFileError(f"cannot open {path}: no such file") from e
    except (OSError, zipfile.BadZipFile) as e:
        raise DataFileError(f"cannot read {path.name} as NPZ: {e}") from e
    with zf:
        x = _NpyStream(zf, "x")
        try:
            y = _NpyStream(zf, "y")
        except DataFileError:
            x.close()
            raise
        try:
            yield x, y
        finally:
            x.close()
            y.close()


def npz_shape(path: Path) -> tuple[int, int, int]:
    """(N, D, T) of the file (rows, features, label values per row), from the headers alone."""
    with _opened(path) as (x, y):
        _check(x, y)
        return x.rows, x.width, y.width


def npz_sample_shape(path: Path) -> tuple[int, ...]:
    """Per-sample shape of ``x`` (e.g. (1, 28, 28)), from its header alone."""
    with _opened(path) as (x, _y):
        return tuple(int(v) for v in x.shape[1:])


def _check(x: _NpyStream, y: _NpyStream) -> None:
    if x.rows != y.rows:
        raise DataFileError(f"x has {x.rows} rows but y has {y.rows}; they must match")
    if x.width == 0:
        raise DataFileError(f"x of shape {list(x.shape)} has no feature values")
    if x.dtype.kind in "US":
        raise DataFileError(f"x holds text ({x.dtype}); features must be numbers")


def npz_chunks(path: Path, chunk_rows: int, start_row: int, label_kind: str) -> Iterator[Chunk]:
    with _opened(path) as (x, y):
        _check(x, y)
        if label_kind == "class" and y.width != 1:
            raise DataFileError(f"class labels need y of shape [N]; got {list(y.shape)}")
        for s in (x, y):
            s.seek_row(min(start_row - 1, s.rows))
        row = start_row
        while row <= x.rows:
            n = min(chunk_rows, x.rows - row + 1)
            yield _chunk(x.read(n, row), y.read(n, row), row, label_kind, y.width)
            row += n


def _chunk(xb: np.ndarray, yb: np.ndarray, first_row: int, label_kind: str, targets: int) -> Chunk:
    xs = labels = None
    bad_x = bad_y = None
    try:
        xs = _features(xb)
    except BadValue as b:
        bad_x = b
    try:
        labels = _class_labels(yb[:, 0]) if label_kind == "class" else _float_labels(yb, targets)
    except BadValue as b:
        bad_y = b
    bad = first_bad(bad_x, bad_y)
    if bad is not None:
        raise bad.at(first_row)
    assert xs is not None and labels is not None
    return Chunk(first_row=first_row, x=xs, labels=labels, bytes_read=None)


def _features(block: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # overflow → inf, reported below
        out = block.astype(np.float32)
    if np.isfinite(out).all():
        return out
    wide = block.astype(np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(out)
    i, j = _first_cell(bad)
    v = float(wide[i, j])
    if np.isnan(v):
        reason = "value is NaN"
    elif np.isinf(v):
        reason = f"value is infinite ({v})"
    else:
        reason = f"{v!r} does not fit in float32"
    raise BadValue(i, j, f"f{j}", reason)


def _first_cell(bad: np.ndarray) -> tuple[int, int]:
    """Row-major first True: first bad row, then its leftmost bad column."""
    i = int(np.argmax(bad.any(axis=1)))
    return i, int(np.argmax(bad[i]))


def _float_labels(block: np.ndarray, targets: int) -> np.ndarray:
    if block.dtype.kind in "US":
        raise BadValue(0, 0, "y", "float labels must be numbers, y holds text")
    out = block.astype(np.float64)
    finite = np.isfinite(out)
    if finite.all():
        return out
    i, t = _first_cell(~finite)
    raise BadValue(i, 1 << 30, "y" if targets == 1 else f"y[{t}]", f"value is {out[i, t]}")


def _class_labels(col: np.ndarray) -> np.ndarray:
    kind = col.dtype.kind
    if kind in "iub":
        if kind == "u" and col.dtype.itemsize == 8 and col.size and col.max() > np.iinfo(np.int64).max:
            i = int(np.argmax(col > np.iinfo(np.int64).max))
            raise BadValue(i, 1 << 30, "y", f"label {col[i]} is too large")
        return col.astype(np.int64)
    if kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(col) | (np.abs(col) >= 2.0**63) | (col != np.round(col))
        if bad.any():
            i = int(np.argmax(bad))
            raise BadValue(i, 1 << 30, "y", f"{float(col[i])!r} is not an integer class label")
        return col.astype(np.int64)
    text = col.astype(str) if kind == "S" else col.copy()  # copy: frombuffer gives a read-only view
    empty = np.char.str_len(np.char.strip(text)) == 0
    if empty.any():
        raise BadValue(int(np.argmax(empty)), 1 << 30, "y", "label is missing")
    return text
