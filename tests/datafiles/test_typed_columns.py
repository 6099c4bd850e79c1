"""Typed CSV / Parquet columns: text, booleans and missing values by column type; type
inference; a wrong value stops the read naming its row and column across chunks; the chunks'
encoded rows equal the encoder applied to the same values given as Python values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.core.encoding import Encoding, parse_values
from app.intake.files import DataFileError, csv_reader, iter_chunks, read_columns
from app.intake.files.readers import iter_scoring_chunks
from app.intake.files.typed import has_missing, infer_kind

CSV = """id,city,size,member,score,label
1,Paris,1.5,True,3,a
2, Oslo ,NA,false,,b
3,,2.5,yes,7,a
4,Paris,,N/A,1,b
5,Rome,4,no,2,a
6,N/A,3.25,TRUE,9,b
"""
KINDS = {"id": "numeric", "city": "categorical", "size": "numeric", "member": "boolean", "score": "numeric"}
# the same values as Python values (what a client would send), read by hand from CSV above
PY = {"id": [1, 2, 3, 4, 5, 6], "city": ["Paris", "Oslo", None, "Paris", "Rome", None],
      "size": [1.5, None, 2.5, None, 4, 3.25], "member": [True, False, True, None, False, True],
      "score": [3, None, 7, 1, 2, 9]}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(csv_reader, "CSV_BLOCK_SIZE", 64)  # several blocks even for a tiny file


def parquet_of(tmp_path: Path) -> Path:
    table = pa.table({**{k: v for k, v in PY.items()}, "label": ["a", "b"] * 3})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=4)
    return path


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_inference_and_encoded_chunks(tmp_path: Path, fmt: str) -> None:
    if fmt == "csv":
        path = tmp_path / "t.csv"
        path.write_text(CSV)
    else:
        path = parquet_of(tmp_path)
    names, cols, labels = read_columns(path, ["label"])
    assert names == list(KINDS) and labels.tolist() == ["a", "b"] * 3
    assert {n: infer_kind(c) for n, c in zip(names, cols, strict=True)} == KINDS
    assert [has_missing(c) for c in cols] == [False, True, True, True, True]

    kinds = list(KINDS.values())
    parsed = [parse_values(PY[n], k, n) for n, k in KINDS.items()]
    enc = Encoding.fit(names, kinds, parsed, min_count=1)
    expected, _ = enc.encode(parsed)
    chunks = list(iter_chunks(path, ["label"], names, chunk_rows=4, encoding=enc))
    assert [c.first_row for c in chunks] == [1, 5]
    np.testing.assert_array_equal(np.concatenate([c.x for c in chunks]), expected)
    raw = [r for c in chunks for r in c.raw]
    assert raw[1] == '[2,"Oslo",null,false,null]' and raw[3] == '[4,"Paris",null,null,1]'
    scored = list(iter_scoring_chunks(path, names, enc, ["id"], chunk_rows=5))
    np.testing.assert_array_equal(np.concatenate([c.x for c in scored]), expected)
    ids = [v for c in scored for v in c.kept.column("id").to_pylist()]
    assert ids == (["1", "2", "3", "4", "5", "6"] if fmt == "csv" else [1, 2, 3, 4, 5, 6])


def test_wrong_type_names_row_and_column(tmp_path: Path) -> None:
    rows = "\n".join(f"{i},Paris,{i}.5,true,a" for i in range(1, 40))
    path = tmp_path / "bad.csv"
    path.write_text("n,city,size,member,label\n" + rows + "\n40,Oslo,big,false,b\n41,Oslo,1,maybe,b\n")
    enc = Encoding.fit(["n", "city", "size", "member"], ["numeric", "categorical", "numeric", "boolean"],
                       [np.array([1.0]), np.array(["Paris"], dtype=object), np.array([1.0]), np.array([1.0])])
    with pytest.raises(DataFileError) as e:
        for _ in iter_chunks(path, ["label"], None, chunk_rows=16, encoding=enc):
            pass
    assert (e.value.row, e.value.column) == (40, "size") and "'big' is not a number" in str(e.value)

    pq.write_table(pa.table({"n": [1, 2, 3], "city": ["a", "b", "c"], "size": [1.0, math.inf, 2.0],
                             "member": [True, None, False], "label": ["a", "b", "a"]}),
                   tmp_path / "bad.parquet")
    with pytest.raises(DataFileError) as e:
        list(iter_chunks(tmp_path / "bad.parquet", ["label"], None, chunk_rows=2, encoding=enc))
    assert (e.value.row, e.value.column) == (2, "size") and "infinite" in str(e.value)


def test_integers_are_numeric_unless_asked(tmp_path: Path) -> None:
    pq.write_table(pa.table({"code": [1, 2, 3, 1], "flag": [True, False, None, True], "y": [0, 1, 0, 1]}),
                   tmp_path / "t.parquet")
    names, cols, _ = read_columns(tmp_path / "t.parquet", ["y"])
    assert [infer_kind(c) for c in cols] == ["numeric", "boolean"]
    enc = Encoding.fit(names, ["categorical", "boolean"],
                       [parse_values([1, 2, 3, 1], "categorical", "code"),
                        parse_values([True, False, None, True], "boolean", "flag")], min_count=1)
    (chunk,) = iter_chunks(tmp_path / "t.parquet", ["y"], names, encoding=enc)
    assert enc.columns[0].categories == ("1", "2", "3")
    np.testing.assert_array_equal(chunk.x[:, :3], np.eye(3, dtype=np.float32)[[0, 1, 2, 0]])
    np.testing.assert_array_equal(chunk.x[:, 3:], [[1, 0], [0, 0], [1, 1], [1, 0]])
