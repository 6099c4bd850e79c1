"""app.intake.files: round trips, column choice, chunk boundaries, exact bad-row reports, bounded memory."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from app.intake.files import (
    Chunk,
    DataFileError,
    csv_reader,
    detect_format,
    file_columns,
    iter_chunks,
    read_table,
    total_rows,
)

# ---------------------------------------------------------------------------------------------
# helpers


def write_csv(path: Path, header: list[str], rows: list[list[object]] | list[str]) -> Path:
    """rows: lists of values, or raw lines (to plant malformed ones)."""
    lines = [",".join(header)]
    lines += [r if isinstance(r, str) else ",".join(str(v) for v in r) for r in rows]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def grid(n: int, d: int = 3) -> np.ndarray:
    """Distinct float32-exact values: row r, column j holds r + j / 8."""
    return (np.arange(1, n + 1)[:, None] + np.arange(d)[None, :] / 8).astype(np.float32)


def numbered_csv(path: Path, n: int) -> Path:
    """Columns a, b, c (= grid) and y (= row % 3); row r is data row r."""
    x = grid(n)
    rows = [[*(repr(float(v)) for v in x[r]), (r + 1) % 3] for r in range(n)]
    return write_csv(path, ["a", "b", "c", "y"], rows)


def numbered_parquet(path: Path, n: int, row_group_size: int | None = None) -> Path:
    x = grid(n)
    table = pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": np.arange(1, n + 1) % 3})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def numbered_npz(path: Path, n: int, compressed: bool = False) -> Path:
    save = np.savez_compressed if compressed else np.savez
    save(path, x=grid(n), y=np.arange(1, n + 1) % 3)
    return path


def collect(path: Path, **kw: object) -> tuple[list[Chunk], DataFileError | None]:
    """The chunks yielded before an error, and the error."""
    chunks: list[Chunk] = []
    try:
        for chunk in iter_chunks(path, **kw):  # type: ignore[arg-type]
            chunks.append(chunk)
    except DataFileError as e:
        return chunks, e
    return chunks, None


def assert_stopped_at(chunks: list[Chunk], err: DataFileError | None, row: int, column: str | None,
                      chunk_rows: int, start_row: int = 1) -> None:
    """The error names row/column, and every chunk before the bad row's chunk (only those) came out."""
    assert err is not None, "no error raised"
    assert (err.row, err.column) == (row, column), str(err)
    assert f"row {row}" in str(err)
    if column is not None:
        assert repr(column) in str(err)
    yielded = (row - start_row) // chunk_rows * chunk_rows
    assert [c.first_row for c in chunks] == list(range(start_row, start_row + yielded, chunk_rows))
    assert sum(len(c.x) for c in chunks) == yielded


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow parses the CSV in many small blocks, so bad values land in the 2nd+ block."""
    monkeypatch.setattr(csv_reader, "CSV_BLOCK_SIZE", 1024)


# ---------------------------------------------------------------------------------------------
# formats and round trips


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("a.csv", "csv"), ("A.CSV", "csv"), ("a.csv.gz", "csv"), ("a.parquet", "parquet"), ("a.pq", "parquet"),
     ("a.npz", "npz")],
)
def test_detect_format(name: str, fmt: str) -> None:
    assert detect_format(name) == fmt


def test_unsupported_suffix_names_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match=r"\.csv, \.csv\.gz, \.parquet, \.pq, \.npz") as e:
        list(iter_chunks(tmp_path / "data.xlsx", ["y"]))
    assert e.value.row is None


@pytest.mark.parametrize("name", ["d.csv", "d.csv.gz"])
def test_csv_round_trip(tmp_path: Path, name: str) -> None:
    path = numbered_csv(tmp_path / name, 7)
    assert file_columns(path) == ["a", "b", "c", "y"]
    assert total_rows(path) is None
    x, y, names = read_table(path, ["y"])
    np.testing.assert_array_equal(x, grid(7))
    assert x.dtype == np.float32
    assert y.dtype == np.int64 and y.tolist() == [1, 2, 0, 1, 2, 0, 1]
    assert names == ["a", "b", "c"]


def test_csv_text_and_float_labels(tmp_path: Path) -> None:
    rows = [["cat", 1.5, 0.25, -2], ["dog", 2.5, 1, 3e5]]
    path = write_csv(tmp_path / "d.csv", ["animal", "f", "t1", "t2"], rows)
    _, y, _ = read_table(path, ["animal"], ["f"])
    assert y.tolist() == ["cat", "dog"] and all(isinstance(v, str) for v in y)
    x, y, _ = read_table(path, ["t1", "t2"], ["f"], label_kind="float")
    assert y.dtype == np.float64 and y.tolist() == [[0.25, -2.0], [1.0, 3e5]]
    np.testing.assert_array_equal(x, [[1.5], [2.5]])


def test_parquet_round_trip(tmp_path: Path) -> None:
    table = pa.table({
        "f64": pa.array([0.5, -1.25, 3e30]),
        "i32": pa.array([1, -2, 3], pa.int32()),
        "f32": pa.array([0.1, 0.2, 0.3], pa.float32()),
        "label": pa.array(["a", "b", "a"]).dictionary_encode(),
        "n": pa.array([7, 8, 9]),
    })
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    assert file_columns(path) == ["f64", "i32", "f32", "label", "n"]
    assert total_rows(path) == 3
    x, y, names = read_table(path, ["label"], ["f64", "i32", "f32"])
    assert names == ["f64", "i32", "f32"]
    np.testing.assert_array_equal(x[:, 0], np.float32([0.5, -1.25, 3e30]))
    np.testing.assert_array_equal(x[:, 1:], np.array([[1, 0.1], [-2, 0.2], [3, 0.3]], np.float32))
    assert y.tolist() == ["a", "b", "a"]
    _, y, _ = read_table(path, ["n"], ["f64"])
    assert y.dtype == np.int64 and y.tolist() == [7, 8, 9]


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip(tmp_path: Path, compressed: bool) -> None:
    x = np.arange(4 * 2 * 3, dtype=np.float64).reshape(4, 2, 3) / 4  # [N, C, W] → [N, 6]
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "d.npz", x=x, y=np.array([3, 1, 4, 1], np.int16))
    path = tmp_path / "d.npz"
    assert file_columns(path) is None and total_rows(path) == 4
    got_x, got_y, names = read_table(path, ["ignored"], ["ignored too"])
    np.testing.assert_array_equal(got_x, x.reshape(4, 6).astype(np.float32))
    assert got_y.dtype == np.int64 and got_y.tolist() == [3, 1, 4, 1]
    assert names == [f"f{j}" for j in range(6)]


def test_npz_float_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=grid(3), y=np.array([[0.5, 1], [2, 3], [4, 5.25]]))
    _, y, _ = read_table(tmp_path / "d.npz", None, label_kind="float")
    assert y.dtype == np.float64 and y.tolist() == [[0.5, 1], [2, 3], [4, 5.25]]


def test_empty_files(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["a", "y"], [])
    x, y, names = read_table(path, ["y"])
    assert x.shape == (0, 1) and y.shape == (0,) and names == ["a"]
    np.savez(tmp_path / "d.npz", x=np.zeros((0, 5)), y=np.zeros((0, 2)))
    x, y, names = read_table(tmp_path / "d.npz", None, label_kind="float")
    assert x.shape == (0, 5) and y.shape == (0, 2) and len(names) == 5


# ---------------------------------------------------------------------------------------------
# choosing columns


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_feature_selection_and_order(tmp_path: Path, fmt: str) -> None:
    path = make(fmt, tmp_path, 5)
    x, _, names = read_table(path, ["y"], ["c", "a"])
    assert names == ["c", "a"]
    np.testing.assert_array_equal(x, grid(5)[:, [2, 0]])
    x, _, names = read_table(path, ["a", "y"], label_kind="float")  # default: every other column
    assert names == ["b", "c"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize(
    ("labels", "features", "missing"), [(["bmi"], None, "bmi"), (["y"], ["a", "bmi"], "bmi")]
)
def test_missing_column_names_it_and_lists_the_file_columns(
    tmp_path: Path, fmt: str, labels: list[str], features: list[str] | None, missing: str
) -> None:
    path = make(fmt, tmp_path, 3)
    chunks, err = collect(path, label_columns=labels, feature_columns=features)
    assert not chunks and err is not None
    assert err.row is None and err.column == missing
    assert "'bmi'" in str(err) and "'a', 'b', 'c', 'y'" in str(err)


def test_bad_column_choices(tmp_path: Path) -> None:
    path = numbered_csv(tmp_path / "d.csv", 3)
    with pytest.raises(DataFileError, match="one column"):
        list(iter_chunks(path, ["a", "y"]))  # several label columns only for float labels
    with pytest.raises(DataFileError, match="label"):
        list(iter_chunks(path, None))
    with pytest.raises(DataFileError, match="both a label and a feature") as e:
        list(iter_chunks(path, ["y"], ["a", "y"]))
    assert e.value.column == "y"
    with pytest.raises(ValueError, match="label_kind"):
        list(iter_chunks(path, ["y"], label_kind="regression"))


# ---------------------------------------------------------------------------------------------
# chunk boundaries


def make(fmt: str, tmp_path: Path, n: int) -> Path:
    if fmt == "csv":
        return numbered_csv(tmp_path / "d.csv", n)
    if fmt == "csv.gz":
        return numbered_csv(tmp_path / "d.csv.gz", n)
    if fmt == "parquet":
        return numbered_parquet(tmp_path / "d.parquet", n, row_group_size=4)  # start rows skip groups
    return numbered_npz(tmp_path / "d.npz", n, compressed=fmt == "npz-deflated")


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "parquet", "npz", "npz-deflated"])
@pytest.mark.parametrize("start_row", [1, 2, 5, 9, 23, 24, 40])
def test_chunk_boundaries_and_start_row(tmp_path: Path, fmt: str, start_row: int) -> None:
    path = make(fmt, tmp_path, 23)
    chunks = list(iter_chunks(path, ["y"], ["a", "b", "c"], chunk_rows=5, start_row=start_row))
    firsts = list(range(start_row, 24, 5))
    assert [c.first_row for c in chunks] == firsts
    assert [len(c.x) for c in chunks] == [min(5, 24 - f) for f in firsts]
    if chunks:
        np.testing.assert_array_equal(np.concatenate([c.x for c in chunks]), grid(23)[start_row - 1:])
        assert np.concatenate([c.labels for c in chunks]).tolist() == [r % 3 for r in range(start_row, 24)]
    assert all(c.x.dtype == np.float32 and c.x.flags.c_contiguous for c in chunks)
    progress = [c.bytes_read for c in chunks]
    if fmt.startswith("csv"):
        assert progress == sorted(progress) and all(b > 0 for b in progress)
    else:
        assert all(b is None for b in progress)


def test_bad_arguments(tmp_path: Path) -> None:
    path = numbered_csv(tmp_path / "d.csv", 3)
    for kw in ({"chunk_rows": 0}, {"start_row": 0}):
        with pytest.raises(ValueError):
            list(iter_chunks(path, ["y"], **kw))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# bad values: exact row and column, chunk holding it never yielded

BAD_CSV_VALUES = [
    ("abc", "'abc' is not a number"),
    ("", "missing"),
    ("NaN", "NaN"),
    ("nan", "NaN"),
    ("inf", "infinite"),
    ("-Infinity", "infinite"),
    ("1e39", "does not fit in float32"),
    ("NA", "'NA' is not a number"),
    ("1,5", "expected 4 fields, got 5"),
]


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize(("value", "reason"), BAD_CSV_VALUES)
@pytest.mark.parametrize("row", [1, 100, 101, 637, 1000])
def test_csv_bad_value_exact_row(tmp_path: Path, value: str, reason: str, row: int) -> None:
    path = numbered_csv(tmp_path / "d.csv", 1000)  # ~25 bytes a row: 1 KiB blocks, 25+ of them
    lines = path.read_text().splitlines()
    cells = lines[row].split(",")
    cells[1] = value
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    chunks, err = collect(path, label_columns=["y"], chunk_rows=100)
    column = None if "fields" in reason else "b"
    assert_stopped_at(chunks, err, row, column, chunk_rows=100)
    assert err is not None and reason in str(err)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("line", ["5,6", "5,6,7,8,9", ""])
@pytest.mark.parametrize(("row", "start_row"), [(1, 1), (250, 1), (300, 1), (301, 1), (1000, 1), (400, 301)])
def test_csv_wrong_field_count(tmp_path: Path, line: str, row: int, start_row: int) -> None:
    path = numbered_csv(tmp_path / "d.csv", 1000)
    lines = path.read_text().splitlines()
    lines[row] = line
    path.write_text("\n".join(lines) + "\n")
    chunks, err = collect(path, label_columns=["y"], chunk_rows=100, start_row=start_row)
    assert_stopped_at(chunks, err, row, "a" if line == "" else None, chunk_rows=100, start_row=start_row)


@pytest.mark.usefixtures("small_blocks")
def test_csv_first_bad_row_wins(tmp_path: Path) -> None:
    path = numbered_csv(tmp_path / "d.csv", 1000)
    lines = path.read_text().splitlines()
    lines[470] = "1.0,2.0,x,1"  # pyarrow fails on this one (and cannot say where)...
    lines[460] = "NaN,2.0,3.0,1"  # ...but this earlier one, which it parses, is the first bad row
    lines[480] = "1,2"  # and a short row after both
    path.write_text("\n".join(lines) + "\n")
    chunks, err = collect(path, label_columns=["y"], chunk_rows=100)
    assert_stopped_at(chunks, err, 460, "a", chunk_rows=100)

    lines[460] = "1.0,inf,3.0,1"
    lines[455] = "1.0,2.0,3.0"  # short row before the bad values
    path.write_text("\n".join(lines) + "\n")
    chunks, err = collect(path, label_columns=["y"], chunk_rows=100)
    assert_stopped_at(chunks, err, 455, None, chunk_rows=100)


def test_csv_leftmost_bad_column_of_the_row(tmp_path: Path) -> None:
    rows = [[0, 1, 2, 3], [1, 1, "x", "nan"], [0, "", 1, 1]]
    path = write_csv(tmp_path / "d.csv", ["y", "a", "b", "c"], rows)
    _, err = collect(path, label_columns=["y"], feature_columns=["c", "b", "a"])
    assert err is not None and (err.row, err.column) == (2, "b")


def test_csv_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["a", "y"], [[1, 0], [2, 1], [3, "cat"], [4, 1]])
    chunks, err = collect(path, label_columns=["y"], chunk_rows=2)  # first chunk's labels are integers
    assert_stopped_at(chunks, err, 3, "y", chunk_rows=2)
    path = write_csv(tmp_path / "d.csv", ["a", "y"], [[1, 0], [2, ""]])
    _, err = collect(path, label_columns=["y"])
    assert err is not None and (err.row, err.column) == (2, "y") and "missing" in str(err)
    path = write_csv(tmp_path / "d.csv", ["a", "t"], [[1, 0.5], [2, "high"]])
    _, err = collect(path, label_columns=["t"], label_kind="float")
    assert err is not None and (err.row, err.column) == (2, "t") and "'high' is not a number" in str(err)


@pytest.mark.usefixtures("small_blocks")
def test_csv_invalid_utf8(tmp_path: Path) -> None:
    path = numbered_csv(tmp_path / "d.csv", 500)
    data = path.read_bytes().replace(b"\n321.0,", b"\n\xff\xfe,")  # row 321, column a
    path.write_bytes(data)
    chunks, err = collect(path, label_columns=["y"], chunk_rows=64)
    assert_stopped_at(chunks, err, 321, "a", chunk_rows=64)


@pytest.mark.parametrize(
    ("column", "reason"),
    [
        (pa.array([1.0, 2.0, None, 4.0, 5.0, 6.0, 7.0]), "missing"),
        (pa.array([1.0, 2.0, float("nan"), 4.0, 5.0, 6.0, 7.0]), "NaN"),
        (pa.array([1.0, 2.0, -float("inf"), 4.0, 5.0, 6.0, 7.0]), "infinite"),
        (pa.array([1.0, 2.0, 1e300, 4.0, 5.0, 6.0, 7.0]), "does not fit in float32"),
        (pa.array(["1", " 2.5 ", "abc", "4", "5", "6", "7"]), "'abc' is not a number"),
    ],
)
def test_parquet_bad_values(tmp_path: Path, column: pa.Array, reason: str) -> None:
    n = 7
    table = pa.table({"a": np.arange(n, dtype=np.float64), "b": column, "y": np.arange(n) % 2})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    chunks, err = collect(tmp_path / "d.parquet", label_columns=["y"], chunk_rows=2)
    assert_stopped_at(chunks, err, 3, "b", chunk_rows=2)
    assert err is not None and reason in str(err)
    chunks, err = collect(tmp_path / "d.parquet", label_columns=["y"], chunk_rows=2, start_row=4)
    assert err is None and [c.first_row for c in chunks] == [4, 6]  # the bad row is skipped


def test_parquet_labels(tmp_path: Path) -> None:
    table = pa.table({"a": [1.0, 2.0, 3.0], "y": pa.array(["x", None, "z"]), "t": [0.0, 1.5, float("nan")]})
    pq.write_table(table, tmp_path / "d.parquet")
    _, err = collect(tmp_path / "d.parquet", label_columns=["y"], feature_columns=["a"])
    assert err is not None and (err.row, err.column) == (2, "y")
    _, err = collect(tmp_path / "d.parquet", label_columns=["t"], feature_columns=["a"])
    assert err is not None and (err.row, err.column) == (2, "t") and "1.5 is not an integer" in str(err)
    _, err = collect(tmp_path / "d.parquet", label_columns=["t"], feature_columns=["a"], label_kind="float")
    assert err is not None and (err.row, err.column) == (3, "t")


def test_parquet_column_of_the_wrong_type(tmp_path: Path) -> None:
    table = pa.table({"a": [1.0], "when": pa.array([0], pa.timestamp("s")), "y": [1]})
    pq.write_table(table, tmp_path / "d.parquet")
    _, err = collect(tmp_path / "d.parquet", label_columns=["y"])
    assert err is not None and err.column == "when" and err.row is None


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize(("row", "col", "value", "reason"), [
    (1, 0, np.nan, "NaN"), (10, 2, np.inf, "infinite"), (11, 1, 1e39, "float32"), (23, 2, np.nan, "NaN"),
])
def test_npz_bad_values(
    tmp_path: Path, compressed: bool, row: int, col: int, value: float, reason: str
) -> None:
    x = grid(23).astype(np.float64)
    x[row - 1, col] = value
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "d.npz", x=x, y=np.zeros(23, np.int64))
    chunks, err = collect(tmp_path / "d.npz", label_columns=None, chunk_rows=5)
    assert_stopped_at(chunks, err, row, f"f{col}", chunk_rows=5)
    assert err is not None and reason in str(err)


def test_npz_bad_labels_and_shapes(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=grid(6), y=np.array([0, 1, 2, 3.5, 4, 5]))
    chunks, err = collect(tmp_path / "d.npz", label_columns=None, chunk_rows=2)
    assert_stopped_at(chunks, err, 4, "y", chunk_rows=2)
    np.savez(tmp_path / "d.npz", x=grid(6), y=np.zeros(5))
    with pytest.raises(DataFileError, match="x has 6 rows but y has 5") as e:
        list(iter_chunks(tmp_path / "d.npz", None))
    assert e.value.row is None
    np.savez(tmp_path / "d.npz", x=grid(6))
    with pytest.raises(DataFileError, match="no array 'y'"):
        list(iter_chunks(tmp_path / "d.npz", None))


def test_unreadable_files(tmp_path: Path) -> None:
    for name in ("missing.csv", "missing.parquet", "missing.npz"):
        with pytest.raises(DataFileError):
            list(iter_chunks(tmp_path / name, ["y"]))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name in ("junk.parquet", "junk.npz"):
        with pytest.raises(DataFileError, match="cannot read"):
            list(iter_chunks(tmp_path / name, ["y"]))


# ---------------------------------------------------------------------------------------------
# bounded memory and a light import

BIG = 300_000


def test_csv_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(csv_reader, "CSV_BLOCK_SIZE", 1 << 16)
    rng = np.random.default_rng(0)
    columns = {"a": rng.standard_normal(BIG), "b": rng.standard_normal(BIG), "y": rng.integers(0, 5, BIG)}
    table = pa.table(columns)
    path = tmp_path / "big.csv"
    pacsv.write_csv(table, path)
    size = path.stat().st_size
    baseline = pa.total_allocated_bytes()
    in_use, sizes, progress = [], [], []
    for chunk in iter_chunks(path, ["y"], chunk_rows=10_000):
        sizes.append(len(chunk.x))
        progress.append(chunk.bytes_read)
        in_use.append(pa.total_allocated_bytes() - baseline)
    assert max(sizes) == 10_000 and sum(sizes) == BIG
    assert progress[0] < size / 4 and progress[-1] == size  # read as it goes
    assert max(in_use) < table.nbytes / 4


def test_parquet_streams_within_a_row_group(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    table = pa.table({f"f{j}": rng.standard_normal(BIG) for j in range(4)} | {"y": rng.integers(0, 5, BIG)})
    path = tmp_path / "big.parquet"
    pq.write_table(table, path, row_group_size=BIG, use_dictionary=False, data_page_size=1 << 16)
    baseline = pa.total_allocated_bytes()
    in_use, sizes = [], []
    for chunk in iter_chunks(path, ["y"], chunk_rows=10_000):
        sizes.append(len(chunk.x))
        in_use.append(pa.total_allocated_bytes() - baseline)
    assert max(sizes) == 10_000 and sum(sizes) == BIG
    assert max(in_use) < table.nbytes / 4  # one row group, yet never decoded whole


def test_npz_streams(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "big.npz", x=np.ones((BIG, 4), np.float32), y=np.zeros(BIG, np.int8))
    sizes = [len(c.x) for c in iter_chunks(tmp_path / "big.npz", None, chunk_rows=10_000)]
    assert max(sizes) == 10_000 and sum(sizes) == BIG


def test_import_does_not_load_torch_or_pandas() -> None:
    code = "import sys, app.intake.files; print(sorted({'torch', 'pandas'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
