"""pyarrow columns → validated numpy arrays; when a chunk fails, find its first bad value exactly.

The fast path converts whole columns and checks finiteness once on the result; only a chunk
that fails pays for `locate_*`, which finds the first bad row and says what is wrong with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.intake.files.base import BadValue, DataFileError, describe

_TRIM = " \t"  # pyarrow's CSV number parser ignores these around a value; text columns must too
_INT64_LIMIT = 2.0**63
_REJECTED = (pa.ArrowInvalid, pa.ArrowNotImplementedError)  # what a failed cast raises


@dataclass
class IntGuess:
    """CSV class labels arrive as text: integers if the first chunk's labels all are, else strings."""

    ints: bool | None = None


_NUMPY_TYPES = {pa.float64(): np.float64, pa.int64(): np.int64, pa.int32(): np.int32, pa.uint8(): np.uint8}


def numpy_of(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A primitive column's values as a read-only numpy view; null slots hold garbage.

    Not pyarrow's to_numpy: that imports pandas (+35 MB RSS, ~1 s) on first use.
    """
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    dtype = np.dtype(_NUMPY_TYPES[col.type])
    if len(col) == 0:
        return np.empty(0, dtype)
    return np.frombuffer(col.buffers()[1], dtype, count=len(col), offset=col.offset * dtype.itemsize)


def _nulls(col: pa.ChunkedArray) -> np.ndarray:
    return numpy_of(pc.cast(pc.is_null(col), pa.uint8())).astype(bool)


def is_text(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t) or pa.types.is_large_string(t)
        or pa.types.is_binary(t) or pa.types.is_large_binary(t)
    )


def _is_number(t: pa.DataType) -> bool:
    return (
        pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
        or pa.types.is_boolean(t) or pa.types.is_null(t)
    )


def check_type(name: str, t: pa.DataType, what: str) -> None:
    """Refuse up front a column no value of which could be a number or label (dates, lists…)."""
    base = t.value_type if pa.types.is_dictionary(t) else t
    if not (_is_number(base) or is_text(base)):
        raise DataFileError(f"has type {t}; {what} must be numbers or text", column=name)


def _plain(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dictionary-encoded columns (pandas categoricals) as their values."""
    return col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col


def _utf8(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Text as UTF-8 strings; raises pa.ArrowInvalid on bytes that are not UTF-8."""
    binary = pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)
    return col.cast(pa.string()) if binary else col


def to_float64(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """The column as float64, nulls kept; raises pa.ArrowInvalid on text that is not a number."""
    col = _plain(col)
    if is_text(col.type):
        return pc.cast(pc.utf8_trim(_utf8(col), _TRIM), pa.float64())
    if col.type == pa.float64():
        return col
    # unsafe: integers past 2**53 merely round, as they would in float32 anyway
    return col.cast(pa.float64(), safe=False)


def first_failing(col: pa.ChunkedArray, convert: Callable[[pa.ChunkedArray], object]) -> int:
    """Index of the first value `convert` rejects (it rejects the whole column): binary search, O(n)."""
    lo, hi = 0, len(col)  # the first failure lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            convert(col.slice(lo, mid - lo))
            lo = mid
        except _REJECTED:
            hi = mid
    return lo


def _not_a_number(value: object) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return "value is empty" if not text.strip() else f"{describe(value)} is not a number"


class _Slow(Exception):
    """The fast path cannot convert this chunk; locate the bad value."""


def float_matrix(
    cols: Sequence[pa.ChunkedArray], names: Sequence[str], orders: Sequence[int], dtype: type
) -> np.ndarray:
    """Columns → [n, len(cols)] array of `dtype`, all finite; raises BadValue for the first bad one."""
    n = len(cols[0]) if cols else 0
    out = np.empty((len(cols), n), dtype)  # filled row by row: contiguous writes, one transpose copy
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow → inf, caught below
            for j, col in enumerate(cols):
                if col.null_count:
                    raise _Slow
                out[j] = numpy_of(to_float64(col))
    except (_Slow, *_REJECTED) as e:
        raise locate_floats(cols, names, orders, dtype == np.float32) from e
    if not np.isfinite(out).all():
        raise locate_floats(cols, names, orders, dtype == np.float32)
    return np.ascontiguousarray(out.T)


def locate_floats(
    cols: Sequence[pa.ChunkedArray], names: Sequence[str], orders: Sequence[int], f32: bool
) -> BadValue:
    found = []
    for col, name, order in zip(cols, names, orders, strict=True):
        hit = _column_first_bad(col, f32)
        if hit is not None:
            found.append(BadValue(hit[0], order, name, hit[1]))
    if not found:  # cannot happen unless the fast path and this one disagree; never pass bad data
        return BadValue(0, 0, None, "values could not be read as numbers")
    return min(found, key=lambda b: (b.offset, b.order))


def _column_first_bad(col: pa.ChunkedArray, f32: bool) -> tuple[int, str] | None:
    """(offset, reason) of the column's first missing / non-number / non-finite value, if any."""
    limit, why = len(col), None
    try:
        num = to_float64(col)
    except _REJECTED:
        limit = first_failing(col, to_float64)
        why = _not_a_number(col[limit].as_py())
        num = to_float64(col.slice(0, limit))
    hit = _first_non_finite(num, f32)
    if hit is not None:
        return hit
    return (limit, why) if why is not None else None


def _first_non_finite(num: pa.ChunkedArray, f32: bool) -> tuple[int, str] | None:
    vals = numpy_of(num)
    nulls = _nulls(num)
    with np.errstate(over="ignore", invalid="ignore"):
        bad = nulls | ~np.isfinite(vals)
        if f32:
            bad |= np.isinf(vals.astype(np.float32))
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    v = float(vals[i])
    if nulls[i]:
        return i, "value is missing"
    if np.isnan(v):
        return i, "value is NaN"
    if np.isinf(v):
        return i, f"value is infinite ({v})"
    return i, f"{v!r} does not fit in float32"


def class_labels(col: pa.ChunkedArray, name: str, order: int, guess: IntGuess | None) -> np.ndarray:
    """One label column → int64 (integer columns) or str (text columns) [n]; raises BadValue.

    `guess` is given for CSV, where every column arrives as text.
    """
    col = _plain(col)
    t = col.type
    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_null(t):
        return _int_labels(col, name, order)
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return _float_class_labels(col, name, order)
    col = _text_labels(col, name, order)
    if guess is not None:
        if guess.ints is None:
            guess.ints = _parses(col, _csv_int)
        if guess.ints:
            return _csv_int_labels(col, name, order)
    return np.array(col.to_pylist(), dtype=object)


def _missing(col: pa.ChunkedArray, name: str, order: int) -> None:
    if col.null_count:
        i = int(np.argmax(_nulls(col)))
        raise BadValue(i, order, name, "label is missing")


def _int_labels(col: pa.ChunkedArray, name: str, order: int) -> np.ndarray:
    _missing(col, name, order)
    try:
        return numpy_of(col.cast(pa.int64())).copy()
    except pa.ArrowInvalid:  # uint64 past int64
        i = first_failing(col, lambda c: c.cast(pa.int64()))
        raise BadValue(i, order, name, f"label {col[i].as_py()} is too large") from None


def _float_class_labels(col: pa.ChunkedArray, name: str, order: int) -> np.ndarray:
    _missing(col, name, order)
    vals = numpy_of(col.cast(pa.float64(), safe=False))
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(vals) | (np.abs(vals) >= _INT64_LIMIT) | (vals != np.round(vals))
    if bad.any():
        i = int(np.argmax(bad))
        raise BadValue(i, order, name, f"{float(vals[i])!r} is not an integer class label")
    return vals.astype(np.int64)


def utf8_column(col: pa.ChunkedArray, name: str, order: int) -> pa.ChunkedArray:
    """The column as UTF-8 text; the first value that is not is a BadValue naming it."""
    try:
        return _utf8(col)
    except pa.ArrowInvalid:
        i = first_failing(col, _utf8)
        raise BadValue(i, order, name, f"{describe(col[i].as_py())} is not valid UTF-8") from None


def _text_labels(col: pa.ChunkedArray, name: str, order: int) -> pa.ChunkedArray:
    col = utf8_column(col, name, order)
    _missing(col, name, order)
    empty = numpy_of(pc.utf8_length(pc.utf8_trim(col, _TRIM))) == 0
    if empty.any():
        raise BadValue(int(np.argmax(empty)), order, name, "label is missing")
    return col


def _csv_int(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.cast(pc.utf8_trim(col, _TRIM), pa.int64())


def _parses(col: pa.ChunkedArray, convert: Callable[[pa.ChunkedArray], object]) -> bool:
    try:
        convert(col)
    except pa.ArrowInvalid:
        return False
    return True


def _csv_int_labels(col: pa.ChunkedArray, name: str, order: int) -> np.ndarray:
    try:
        return numpy_of(_csv_int(col)).copy()
    except pa.ArrowInvalid:
        i = first_failing(col, _csv_int)
        reason = f"{describe(col[i].as_py())} is not an integer, unlike the labels of the first rows"
        raise BadValue(i, order, name, reason) from None
