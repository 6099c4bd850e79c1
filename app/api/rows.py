"""Rows and labels as clients send them, checked against a version's feature schema.

Shared by ``/predict``, v2 infer and ``/ingest``. A row is a list of numbers in schema order
or an object keyed by feature name; values are strict (finite JSON numbers: no strings,
booleans or null). A label is a class name or index (classification) or a number / list of
numbers (regression targets). Every problem is an ``ApiError(422)`` whose message starts
with the field path (``inputs[0]``, ``samples[3].features['bmi']``, ``samples[1].label``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from app.api.errors import ApiError
from app.core.features import FeatureSchema, SchemaError

FLOAT32_MAX = float(np.finfo(np.float32).max)
Where = Callable[[int], str]  # row index → the field path of that row


def json_kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", list: "array", dict: "object", int: "integer", float: "number"}.get(
        type(value), type(value).__name__)


def is_number(value: Any) -> bool:
    t = type(value)  # exact types: bool is an int subclass and must not pass
    return t is float or t is int


def feature_path(name: str) -> str:
    """``.age`` for identifier-like names, ``['mean radius']`` otherwise."""
    return f".{name}" if name.isidentifier() else f"[{name!r}]"


def schema_error(exc: SchemaError) -> ApiError:
    return ApiError(422, str(exc))


# ---- feature rows ---------------------------------------------------------------------------
def _row_values(row: Any, schema: FeatureSchema, where: str) -> tuple[list[Any], bool]:
    """One row → its values in schema order, and whether it came keyed by feature name."""
    if type(row) is dict:
        try:
            return schema.row_from_object(row, where), True
        except SchemaError as exc:
            raise schema_error(exc) from None
    if type(row) is not list:
        raise ApiError(422, f"{where}: expected a list of {schema.input_dim} numbers or an object keyed "
                            f"by feature name, got {json_kind(row)}")
    shape = schema.input_shape
    if len(shape) > 1 and row and type(row[0]) is list:  # nested in the input shape, e.g. [C][H][W]
        return _flatten_nested(row, shape, where), False
    if len(row) != schema.input_dim:
        raise ApiError(422, f"{where}: expected {schema.input_dim} features, got {len(row)}")
    return row, False


def _flatten_nested(row: list[Any], shape: tuple[int, ...], where: str) -> list[Any]:
    """A row nested as ``shape`` → its values flat, in C-order (422 naming the first misfit)."""
    if len(row) != shape[0]:
        raise ApiError(422, f"{where}: expected {shape[0]} entries here (input shape {list(shape)}), "
                            f"got {len(row)}")
    if len(shape) == 1:
        return row
    flat: list[Any] = []
    for i, part in enumerate(row):
        if type(part) is not list:
            raise ApiError(422, f"{where}[{i}]: expected a list (input shape {list(shape)}), "
                                f"got {json_kind(part)}")
        flat.extend(_flatten_nested(part, shape[1:], f"{where}[{i}]"))
    return flat


def parse_rows(rows: Sequence[Any], schema: FeatureSchema, where: Where, field: str) -> np.ndarray:
    """Client rows (lists and/or objects) → float32 [N, D] in schema order."""
    if not rows:
        raise ApiError(422, f"{field}: must contain at least one row")
    values: list[list[Any]] = []
    named: list[bool] = []
    for i, row in enumerate(rows):
        v, n = _row_values(row, schema, where(i))
        values.append(v)
        named.append(n)

    def path(r: int, c: int) -> str:
        return where(r) + (feature_path(schema.feature_names[c]) if named[r] else f"[{c}]")

    return values_to_float32(values, path)


def values_to_float32(values: list[list[Any]], path: Callable[[int, int], str]) -> np.ndarray:
    """Equal-length rows of JSON values → float32 [N, D]; 422 naming the first bad value."""
    for r, row in enumerate(values):
        if all(is_number(v) for v in row):  # the usual case, checked without the slow loop
            continue
        for c, v in enumerate(row):
            if not is_number(v):
                raise ApiError(422, f"{path(r, c)}: expected a number, got {json_kind(v)}")
    try:
        x64 = np.asarray(values, dtype=np.float64)
    except OverflowError:  # an integer too large even for float64
        x64 = np.asarray([[_as_float(v) for v in row] for row in values], dtype=np.float64)
    bad = ~np.isfinite(x64)
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        what = "is not a finite number" if type(values[r][c]) is float else "is out of float32 range"
        raise ApiError(422, f"{path(r, c)}: value {what}")
    with np.errstate(over="ignore"):  # float32 overflow → inf, reported just below
        x = x64.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        raise ApiError(422, f"{path(r, c)}: value is out of float32 range")
    return x


def _as_float(v: int | float) -> float:
    try:
        return float(v)
    except OverflowError:
        return math.inf


# ---- labels -----------------------------------------------------------------------------------
def parse_labels(labels: Sequence[Any], schema: FeatureSchema, where: Where) -> np.ndarray:
    """Classification labels (class names or indices) → int64 [N]."""
    try:
        return np.asarray([schema.label_index(v, where(i)) for i, v in enumerate(labels)], dtype=np.int64)
    except SchemaError as exc:
        raise schema_error(exc) from None


def _target_values(label: Any, schema: FeatureSchema, where: str) -> list[Any]:
    n = schema.num_outputs
    names = list(schema.target_names)
    if is_number(label):
        if n != 1:
            raise ApiError(422, f"{where}: this model predicts {n} targets {names}; "
                                f"expected a list of {n} numbers, got a single number")
        return [label]
    if type(label) is dict:  # keyed by target name: {"t1": 0.3, "t2": 1.2}
        extra = [k for k in label if k not in names]
        if extra:
            raise ApiError(422, f"{where}: unknown target {extra[0]!r}; targets are {names}")
        absent = [t for t in names if t not in label]
        if absent:
            raise ApiError(422, f"{where}: missing target {absent[0]!r}; targets are {names}")
        return [label[t] for t in names]
    if type(label) is list:
        if len(label) != n:
            raise ApiError(422, f"{where}: expected {n} target value{'s' if n > 1 else ''} {names}, "
                                f"got {len(label)}")
        return label
    raise ApiError(422, f"{where}: expected a number{' or a list of numbers' if n > 1 else ''} "
                        f"(regression target{'s' if n > 1 else ''} {names}), got {json_kind(label)}")


def parse_targets(labels: Sequence[Any], schema: FeatureSchema, where: Where) -> np.ndarray:
    """Regression labels (a number, or a list of numbers for multi-output) → float32 [N, T]."""
    values = [_target_values(v, schema, where(i)) for i, v in enumerate(labels)]
    scalar = [is_number(v) for v in labels]

    def path(r: int, c: int) -> str:
        return where(r) if scalar[r] else f"{where(r)}[{c}]"

    return values_to_float32(values, path)


# ---- value ranges ---------------------------------------------------------------------------
