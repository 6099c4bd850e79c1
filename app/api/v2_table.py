"""v2 infer for versions with column types: one [N] tensor per column, text as BYTES.

Categorical columns come as BYTES (JSON strings, or binary tensor data: each element a 4-byte
little-endian length then its UTF-8 bytes); numeric and boolean ones as FP32/FP64/INT*/BOOL
(JSON ``null`` for a missing value) or BYTES text. A column that had missing values in training
may be left out (every row missing). Values are checked per column type as on ``/predict``.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from app.api.errors import ApiError
from app.api.rows import schema_error
from app.api.schemas import V2Tensor
from app.api.table_rows import TableRows, table_rows_from_columns
from app.core.features import FeatureSchema, SchemaError

_NUMERIC = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4",
            "INT64": "<i8", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "BOOL": "?"}


def input_metadata(schema: FeatureSchema) -> list[dict[str, Any]]:
    """v2 metadata inputs: one per column, with the datatype to send it as."""
    assert schema.encoding is not None
    types = {"categorical": "BYTES", "boolean": "BOOL", "numeric": "FP32"}
    return [{"name": c.name, "datatype": types[c.kind], "shape": [-1],
             "parameters": {"type": c.kind, "optional": c.missing}} for c in schema.encoding.columns]


def tensors_by_name(tensors: list[V2Tensor]) -> dict[str, int]:
    """Feature name → its tensor's position; a name given twice is a 422."""
    by_name: dict[str, int] = {}
    for i, t in enumerate(tensors):
        if t.name in by_name:
            raise ApiError(422, f"inputs[{i}].name: feature {t.name!r} is given twice "
                                f"(also inputs[{by_name[t.name]}])")
        by_name[t.name] = i
    return by_name


def v2_table_rows(tensors: list[V2Tensor], schema: FeatureSchema, raw: list[memoryview | None]) -> TableRows:
    by_name = tensors_by_name(tensors)
    try:
        schema.row_from_object(by_name, "inputs")  # unknown or required-but-absent names
    except SchemaError as exc:
        raise schema_error(exc) from None
    columns: list[list[Any] | None] = []
    n: int | None = None
    first = None
    for name in schema.columns:
        i = by_name.get(name)
        if i is None:
            columns.append(None)
            continue
        values = _column(tensors[i], i, raw[i])
        if n is None:
            n, first = len(values), i
        elif len(values) != n:
            raise ApiError(422, f"inputs[{i}].shape: {len(values)} rows, but inputs[{first}] has {n}")
        columns.append(values)
    if not n:
        raise ApiError(422, "inputs: at least one input tensor with at least one row is needed")
    filled = [c if c is not None else [None] * n for c in columns]
    names = schema.columns
    return table_rows_from_columns(filled, schema,
                                   lambda r, j: f"inputs[{by_name.get(names[j], j)}].data[{r}]")


def _column(tensor: V2Tensor, i: int, raw: memoryview | None) -> list[Any]:
    shape = tensor.shape
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] == 0:
        raise ApiError(422, f"inputs[{i}].shape: feature tensor {tensor.name!r} must have shape [N] or "
                            f"[N, 1] with N >= 1, got {shape}")
    n = shape[0]
    if raw is not None:
        values = _binary(raw, tensor.datatype, n, i)
    else:
        if tensor.data is None:
            raise ApiError(422, f"inputs[{i}].data: Field required")
        values = [v[0] if type(v) is list and len(v) == 1 else v for v in tensor.data]
        if tensor.datatype == "BYTES":
            values = [v if v is None or type(v) is str else _not_text(v, i, r) for r, v in enumerate(values)]
    if len(values) != n:
        raise ApiError(422, f"inputs[{i}].data: shape {shape} needs {n} values, got {len(values)}")
    return values


def _not_text(v: Any, i: int, r: int) -> None:
    raise ApiError(422, f"inputs[{i}].data[{r}]: a BYTES tensor holds strings, got {type(v).__name__}")


def _binary(raw: memoryview, datatype: str, n: int, i: int) -> list[Any]:
    if datatype == "BYTES":
        out: list[Any] = []
        at, data = 0, bytes(raw)
        while at < len(data):
            if at + 4 > len(data):
                raise ApiError(422, f"inputs[{i}]: binary BYTES data ends inside a length prefix")
            (size,) = struct.unpack_from("<I", data, at)
            at += 4
            if at + size > len(data):
                raise ApiError(422, f"inputs[{i}]: binary BYTES element {len(out)} runs past the data")
            try:
                out.append(data[at:at + size].decode("utf-8"))
            except UnicodeDecodeError:
                raise ApiError(422, f"inputs[{i}]: binary BYTES element {len(out)} is not UTF-8") from None
            at += size
        return out
    dtype = _NUMERIC.get(datatype)
    if dtype is None:
        raise ApiError(422, f"inputs[{i}].datatype: {datatype!r} is not supported")
    arr = np.frombuffer(raw, dtype=dtype)
    if arr.size != n:
        raise ApiError(422, f"inputs[{i}]: binary data holds {arr.size} values, shape says {n}")
    vals = arr.tolist()
    return vals if datatype == "BOOL" else [float(v) for v in vals]
