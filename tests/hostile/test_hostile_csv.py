"""Hostile CSV files through the CLI (issue 20, item 7): one 200 MB line must end in a clean
message and exit code (it aborted with SIGABRT, exit 134, after the message: pyarrow's reader,
fed a Python file object, was torn down at interpreter exit), and a 100,000-column file must
neither take minutes (column checks were quadratic) nor print every column name."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.server import copy_store
from tests.owndata.conftest import sample_count, skqk

COLUMNS = 100_000


@pytest.fixture(scope="module")
def long_line_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("csv") / "long.csv"
    with open(path, "w") as f:
        f.write("a,b,label\n")
        for i in range(3000):
            f.write(f"{i},{i % 7},{i % 2}\n")
        f.write("1," + "7" * (200 * 1024 * 1024) + ",0\n")  # one 200 MB line
        f.write("1,2,0\n")
    return path


@pytest.fixture(scope="module")
def wide_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("csv") / "wide.csv"
    with open(path, "w") as f:
        f.write(",".join(f"c{i}" for i in range(COLUMNS)) + ",label\n")
        for r in range(40):
            f.write(",".join(str((r + i) % 3) for i in range(COLUMNS)) + f",{r % 2}\n")
    return path


def test_init_on_a_200mb_line_exits_cleanly(long_line_csv: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    run = skqk(data_dir, "init", "--data", str(long_line_csv), "--label-column", "label", "--arch", "mlp:8",
               "--epochs", "1", "--device", "cpu")
    out = run.stdout + run.stderr
    assert run.returncode == 2, (run.returncode, out[-2000:])  # 134 = SIGABRT
    assert "cannot read" in out and "terminate called" not in out, out[-2000:]
    assert sample_count(data_dir) == 0


def test_ingest_of_a_200mb_line_exits_cleanly(long_line_csv: Path, template_data_dir: Path,
                                              tmp_path: Path) -> None:
    data_dir = copy_store(template_data_dir, tmp_path / "data")
    run = skqk(data_dir, "ingest", str(long_line_csv), "--label-column", "label")
    out = run.stdout + run.stderr
    assert run.returncode == 2, (run.returncode, out[-2000:])  # refused input (docs/OPERATIONS.md)
    assert "terminate called" not in out


def test_a_100k_column_file_is_checked_quickly_and_listed_short(wide_csv: Path, template_data_dir: Path,
                                                                tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    run = skqk(data_dir, "init", "--data", str(wide_csv), "--label-column", "label", "--arch", "mlp:8",
               "--epochs", "1", "--device", "cpu", timeout=240)  # was quadratic: far longer
    out = run.stdout + run.stderr
    assert run.returncode == 2, out[-2000:]  # 40 rows: too few for the holdout
    assert "too few" in out and len(out) < 20_000, out[-2000:]
    assert sample_count(data_dir) == 0

    store = copy_store(template_data_dir, tmp_path / "ingest")
    run = skqk(store, "ingest", str(wide_csv), "--label-column", "label", timeout=240)
    out = run.stdout + run.stderr
    assert run.returncode == 2  # refused input
    assert "more)" in out and len(out) < 20_000, f"{len(out)} bytes of output"
