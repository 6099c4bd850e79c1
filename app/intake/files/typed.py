"""Typed table columns: pyarrow column → the parsed values of a numeric, boolean or categorical
feature (app.core.encoding), with missing values; and the type a column looks like.

Missing: null, an empty cell, NaN, and the words of ``MISSING_TEXT`` (NA, N/A, null, None …).
Booleans: Parquet bool, 0/1, and true/false, yes/no, t/f, y/n in any case. A value that does not
fit its column's type raises BadValue (the caller turns it into a row and column).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.core.encoding import FALSE_TEXT, MISSING_TEXT, TRUE_TEXT, EncodingError, parse_values
from app.intake.files.base import BadValue, describe
from app.intake.files.columns import _plain, first_failing, is_text, numpy_of, utf8_column

_TRIM = " \t"


@cache
def _value_set(words: frozenset[str]) -> pa.Array:
    # built on first use: pa.array at import time would need pandas in the serving image
    return pa.array(sorted(words))


def _text(col: pa.ChunkedArray, name: str, order: int) -> pa.ChunkedArray:
    """UTF-8 text, trimmed, with the missing words as nulls."""
    col = pc.utf8_trim(utf8_column(col, name, order), _TRIM)
    missing = pc.is_in(pc.utf8_lower(col), value_set=_value_set(MISSING_TEXT))
    return pc.if_else(missing, pa.scalar(None, pa.string()), col)


def _nan_filled(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return numpy_of(pc.fill_null(col, np.nan)).copy()


def parse_arrow(col: pa.ChunkedArray, kind: str, name: str, order: int) -> np.ndarray:
    """One column → float64 (NaN missing) for numeric/boolean, object str|None for categorical."""
    col = _plain(col)
    t = col.type
    if kind == "categorical":
        if is_text(t):
            return np.array(_text(col, name, order).to_pylist() or [], dtype=object)
        try:
            return parse_values(col.to_pylist(), kind, name)
        except EncodingError as e:
            raise BadValue(e.row, order, name, e.reason) from None
    if kind == "numeric":
        if is_text(t):
            text = _text(col, name, order)
            try:
                num = pc.cast(text, pa.float64())
            except pa.ArrowInvalid:
                i = first_failing(text, lambda c: pc.cast(c, pa.float64()))
                raise BadValue(i, order, name, f"{describe(text[i].as_py())} is not a number") from None
        elif pa.types.is_null(t):
            return np.full(len(col), np.nan)
        else:
            num = col.cast(pa.float64(), safe=False)
        v = _nan_filled(num)
        if np.isinf(v).any():
            i = int(np.argmax(np.isinf(v)))
            raise BadValue(i, order, name, f"value is infinite ({v[i]})")
        return v
    # boolean
    if pa.types.is_boolean(t) or pa.types.is_null(t):
        return _nan_filled(col.cast(pa.float64()))
    if is_text(t):
        low = pc.utf8_lower(_text(col, name, order))
        ones, zeros = (pc.is_in(low, value_set=_value_set(TRUE_TEXT)),
                       pc.is_in(low, value_set=_value_set(FALSE_TEXT)))
        v = np.where(numpy_of(pc.cast(ones, pa.uint8())).astype(bool), 1.0,
                     np.where(numpy_of(pc.cast(zeros, pa.uint8())).astype(bool), 0.0, np.nan))
        bad = np.isnan(v) & ~numpy_of(pc.cast(pc.is_null(low), pa.uint8())).astype(bool)
    else:
        v = _nan_filled(col.cast(pa.float64(), safe=False))
        bad = ~np.isnan(v) & (v != 0) & (v != 1)
    if bad.any():
        i = int(np.argmax(bad))
        reason = f"{describe(col[i].as_py())} is not a boolean (true/false, yes/no, 1/0)"
        raise BadValue(i, order, name, reason)
    return v


def infer_kind(col: pa.ChunkedArray) -> str:
    """numeric | boolean | categorical, from a whole column (integers stay numeric)."""
    col = _plain(col)
    t = col.type
    if pa.types.is_boolean(t):
        return "boolean"
    if not is_text(t):
        return "numeric"
    try:
        text = _text(col, "", 0)
    except BadValue:
        return "categorical"
    try:
        pc.cast(text, pa.float64())
        return "numeric"
    except pa.ArrowInvalid:
        pass
    low = pc.drop_null(pc.utf8_lower(text))
    if len(low) and pc.all(pc.is_in(low, value_set=_value_set(TRUE_TEXT | FALSE_TEXT))).as_py():
        return "boolean"
    return "categorical"


def has_missing(col: pa.ChunkedArray) -> bool:
    """Whether a column holds a missing value (null, NaN or a missing word)."""
    col = _plain(col)
    if col.null_count:
        return True
    if pa.types.is_floating(col.type):
        return bool(pc.any(pc.is_nan(col)).as_py())
    if is_text(col.type):
        try:
            return _text(col, "", 0).null_count > 0
        except BadValue:
            return False
    return False
