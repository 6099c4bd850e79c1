"""v2 infer inputs of a typed schema: one tensor per column, BYTES as JSON strings or binary
tensor data (4-byte little-endian length + UTF-8), numbers/booleans in any v2 datatype; the
rows equal /predict's raw rows; bad tensors are 422s naming the input."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from app.api.errors import ApiError
from app.api.schemas import V2Tensor
from app.api.table_rows import parse_table_rows
from app.api.v2_table import input_metadata, v2_table_rows
from app.core.encoding import Encoding, parse_values
from app.core.features import FeatureSchema


def schema() -> FeatureSchema:
    names, kinds = ["city", "size", "member"], ["categorical", "numeric", "boolean"]
    values = [["a", "b", None, "a", "b"], [1.0, None, 3.0, 4.0, 5.0], [True, False, True, None, True]]
    parsed = [parse_values(v, k, n) for v, k, n in zip(values, kinds, names, strict=True)]
    enc = Encoding.fit(names, kinds, parsed, min_count=1)
    return FeatureSchema(tuple(enc.input_names()), (enc.width,), num_classes=2, encoding=enc)


def bytes_tensor(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


def test_binary_and_json_tensors_equal_raw_rows() -> None:
    s = schema()
    city = bytes_tensor(["b", "zz", "a"])
    size = np.array([2.5, np.nan, 7.0], "<f4").tobytes()
    member = np.array([True, False, True], "?").tobytes()
    def sized(blob: bytes) -> dict:
        return {"binary_data_size": len(blob)}

    tensors = [V2Tensor(name="city", shape=[3], datatype="BYTES", parameters=sized(city)),
               V2Tensor(name="size", shape=[3, 1], datatype="FP32", parameters=sized(size)),
               V2Tensor(name="member", shape=[3], datatype="BOOL", parameters=sized(member))]
    got = v2_table_rows(tensors, s, [memoryview(city), memoryview(size), memoryview(member)])
    rows = [{"city": "b", "size": 2.5, "member": True}, {"city": "zz", "size": None, "member": False},
            {"city": "a", "size": 7.0, "member": True}]
    want = parse_table_rows(rows, s, lambda i: f"inputs[{i}]", "inputs")
    np.testing.assert_array_equal(got.x, want.x)
    assert got.unknown_counts() == want.unknown_counts() == {"city": 1}  # "zz": never seen
    as_json = v2_table_rows([V2Tensor(name="city", shape=[3], datatype="BYTES", data=["b", "zz", "a"]),
                             V2Tensor(name="size", shape=[3], datatype="FP32", data=[2.5, None, 7.0]),
                             V2Tensor(name="member", shape=[3], datatype="BOOL", data=[True, False, True])],
                            s, [None, None, None])
    np.testing.assert_array_equal(as_json.x, want.x)
    # a column that had missing values may be left out: all its rows missing
    left_out = v2_table_rows([as_json_tensor for as_json_tensor in [
        V2Tensor(name="member", shape=[1], datatype="BOOL", data=[True])]], s, [None])
    np.testing.assert_array_equal(left_out.x, parse_table_rows([{"member": True}], s, str, "inputs").x)
    assert [m["datatype"] for m in input_metadata(s)] == ["BYTES", "FP32", "BOOL"]


@pytest.mark.parametrize(("tensors", "raw", "message"), [
    ([V2Tensor(name="city", shape=[1], datatype="BYTES", data=[3])], [None], "inputs[0].data[0]"),
    ([V2Tensor(name="size", shape=[2], datatype="FP32", data=["x", 1.0])], [None], "inputs[0].data[0]"),
    ([V2Tensor(name="city", shape=[1], datatype="BYTES", parameters={"binary_data_size": 3})],
     [memoryview(b"\x05\x00\x00")], "length prefix"),
    ([V2Tensor(name="nope", shape=[1], datatype="FP32", data=[1.0])], [None], "unknown feature 'nope'"),
    ([V2Tensor(name="size", shape=[2], datatype="FP32", data=[1.0, 2.0]),
      V2Tensor(name="city", shape=[1], datatype="BYTES", data=["a"])], [None, None],
     "inputs[0].shape: 2 rows, but inputs[1] has 1"),
])
def test_bad_tensors_are_422(tensors: list[V2Tensor], raw: list, message: str) -> None:
    with pytest.raises(ApiError) as e:
        v2_table_rows(tensors, schema(), raw)
    assert e.value.status == 422 and message in e.value.message
