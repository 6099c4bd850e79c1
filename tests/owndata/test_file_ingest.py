"""`skqk ingest FILE`: chunked, resumable after kill -9, exactly once, bad rows named."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from app.serving.models import schema_of
from app.storage import Store
from tests.helpers.server import REPO, fast_env
from tests.owndata.conftest import INIT_FAST, breast_cancer_table, sample_count, skqk, write_csv

N_INIT = 569


RANGES: dict[str, tuple[float, float]] = {}


@pytest.fixture
def cancer_store(data_dir: Path, tmp_path: Path) -> Path:
    """A store initialised from the breast cancer CSV (version 1 with class names and ranges)."""
    path = write_csv(breast_cancer_table(), tmp_path / "cancer.csv")
    run = skqk(data_dir, "init", "--data", str(path), "--label-column", "diagnosis", *INIT_FAST)
    assert run.returncode == 0, run.stdout + run.stderr
    store = Store(f"sqlite:///{data_dir / 'skqk.db'}")
    schema = schema_of(store.get_version(1, weights=False))
    store.dispose()
    RANGES.update({n: (lo, hi) for n, lo, hi in zip(schema.feature_names, schema.range_min,
                                                     schema.range_max, strict=True)})
    return data_dir


def more_rows(n: int, seed: int) -> pa.Table:
    """New rows inside the learnt ranges: resampled rows, features nudged by ≤ 1 %."""
    base = breast_cancer_table()
    gen = np.random.default_rng(seed)
    pick = gen.integers(0, base.num_rows, n)
    cols = {}
    for name in base.column_names:
        values = base[name].to_numpy(zero_copy_only=False)[pick]
        if name != "diagnosis":
            values = np.clip(values * gen.uniform(0.99, 1.0, n), *RANGES[name])
        cols[name] = values
    cols["row_id"] = np.arange(1, n + 1)  # an extra column: ignored (columns match by name)
    return pa.table(cols)


def stored_rows_after(data_dir: Path, first_id: int) -> np.ndarray:
    store = Store(f"sqlite:///{data_dir / 'skqk.db'}")
    try:
        rows = store.load_samples(30)
        return rows.x[rows.ids > first_id]
    finally:
        store.dispose()


def sorted_rows(x: np.ndarray) -> np.ndarray:
    return x[np.lexsort(x.T[::-1])]


def test_ingest_survives_kill_and_rerun_stores_exactly_once(cancer_store: Path, tmp_path: Path) -> None:
    n = 60_000
    table = more_rows(n, seed=1)
    path = write_csv(table, tmp_path / "more.csv")
    env = fast_env(cancer_store)
    cmd = [sys.executable, "-m", "app.cli", "ingest", str(path), "--chunk-rows", "300"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # one cheap read-only connection: a poll must be much shorter than the whole ingest
    watcher = sqlite3.connect(f"file:{cancer_store / 'skqk.db'}?mode=ro", uri=True, timeout=10)
    try:
        deadline = time.monotonic() + 120
        while (watcher.execute("SELECT count(*) FROM samples").fetchone()[0] < N_INIT + 3 * 300
               and time.monotonic() < deadline):
            assert proc.poll() is None, "ingest finished before it could be killed; make the file larger"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        watcher.close()
        if proc.poll() is None:
            proc.kill()
    partial = sample_count(cancer_store) - N_INIT
    assert 0 < partial < n and partial % 300 == 0  # whole chunks only: each one commits as a unit

    run = skqk(cancer_store, "ingest", str(path), "--chunk-rows", "300")
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{n - partial} rows stored, {partial} already stored" in run.stdout
    assert sample_count(cancer_store) == N_INIT + n
    expected = np.stack([table[c].to_numpy() for c in breast_cancer_table().column_names if c != "diagnosis"],
                        axis=1).astype(np.float32)
    stored = stored_rows_after(cancer_store, N_INIT)
    np.testing.assert_array_equal(sorted_rows(stored), sorted_rows(expected))

    again = skqk(cancer_store, "ingest", str(path), "--chunk-rows", "300")
    assert again.returncode == 0 and f"0 rows stored, {n} already stored" in again.stdout
    assert sample_count(cancer_store) == N_INIT + n


def _with_value(table: pa.Table, column: str, row: int, value: str) -> pa.Table:
    """``table`` with data row ``row`` (1-based) of ``column`` replaced by the text ``value``."""
    values = [str(v) for v in table[column].to_pylist()]
    values[row - 1] = value
    return table.set_column(table.column_names.index(column), column, pa.array(values))


@pytest.mark.parametrize(("column", "value", "reason"), [
    ("mean radius", "abc", "abc"),
    ("worst area", "", ""),
    ("diagnosis", "benignn", "unknown class 'benignn'"),
    ("mean texture", "9999", "outside its range"),
])
def test_bad_row_stops_with_row_and_column_and_resumes(cancer_store: Path, tmp_path: Path, column: str,
                                                        value: str, reason: str) -> None:
    table = more_rows(5000, seed=2)
    bad = _with_value(table, column, 2345, value)
    path = write_csv(bad, tmp_path / "more.csv")
    run = skqk(cancer_store, "ingest", str(path), "--chunk-rows", "1000")
    assert run.returncode == 2, run.stdout + run.stderr  # refused input: 2, as `skqk init` (was 1)
    message = " ".join(run.stdout.split())
    assert "row 2345" in message and f"'{column}'" in message and reason in message, message
    assert "--start-row 2001" in message
    assert sample_count(cancer_store) == N_INIT + 2000  # earlier chunks stay; nothing of the bad one

    write_csv(table, path)  # fixed
    resumed = skqk(cancer_store, "ingest", str(path), "--chunk-rows", "1000", "--start-row", "2001")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert sample_count(cancer_store) == N_INIT + 5000
    rerun = skqk(cancer_store, "ingest", str(path), "--chunk-rows", "1000")  # from the top: all skipped
    assert rerun.returncode == 0 and sample_count(cancer_store) == N_INIT + 5000


def test_wrong_field_count_names_the_row(cancer_store: Path, tmp_path: Path) -> None:
    path = write_csv(more_rows(3000, seed=3), tmp_path / "more.csv")
    lines = path.read_text().splitlines()
    lines[1500] = lines[1500].rsplit(",", 2)[0]  # data row 1500 loses two fields
    path.write_text("\n".join(lines) + "\n")
    run = skqk(cancer_store, "ingest", str(path), "--chunk-rows", "1000")
    assert run.returncode == 2
    message = " ".join(run.stdout.split())
    assert "row 1500" in message and "--start-row 1001" in message, message
    assert sample_count(cancer_store) == N_INIT + 1000


def test_missing_column_is_named_and_nothing_stored(cancer_store: Path, tmp_path: Path) -> None:
    table = more_rows(100, seed=4).drop(["mean radius"])
    path = write_csv(table, tmp_path / "more.csv")
    run = skqk(cancer_store, "ingest", str(path))
    assert run.returncode == 2 and "mean radius" in run.stdout
    assert "rows/s" not in run.stdout and "━" not in run.stdout  # refused before any chunk: no bar drawn
    assert sample_count(cancer_store) == N_INIT


def test_progress_labels_its_times_and_agrees_with_the_summary(cancer_store: Path, tmp_path: Path) -> None:
    path = write_csv(more_rows(3000, seed=8), tmp_path / ("a-rather-long-file-name-" + "x" * 60 + ".csv"))
    run = skqk(cancer_store, "ingest", str(path), "--chunk-rows", "1000", COLUMNS=None)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    bar = [ln for ln in lines if ln.startswith("ingest")][-1]
    assert "elapsed" in bar and "left" in bar, bar
    summary = next(ln for ln in lines if "rows stored" in ln)
    rate = re.search(r"([\d,]+) rows/s", summary).group(1)
    assert f"{rate} rows/s" in bar, (bar, summary)  # the same figure, not another one
    # not a terminal: nothing wraps at 80 columns (no COLUMNS set), so long lines stay whole
    assert len(summary) > 80 and "rows/s; store total" in summary


def test_refusals_share_one_exit_code_convention(cancer_store: Path, tmp_path: Path, data_dir: Path) -> None:
    """2: the input is refused (bad option, file or data); 1: the store's state stops it."""
    bad = write_csv(more_rows(10, seed=9).drop(["mean radius"]), tmp_path / "bad.csv")
    assert skqk(cancer_store, "ingest", str(bad)).returncode == 2
    again = skqk(cancer_store, "init", "--data", str(bad), "--label-column", "diagnosis", *INIT_FAST)
    assert again.returncode == 1 and "--force" in again.stdout  # a store with versions: state
    empty = tmp_path / "empty"
    assert skqk(empty, "ingest", str(bad)).returncode == 1  # no active version: state
    short = write_csv(more_rows(5, seed=10), tmp_path / "short.csv")  # too few rows to train on
    assert skqk(tmp_path / "empty2", "init", "--data", str(short), "--label-column", "diagnosis",
                *INIT_FAST).returncode == 2


def test_npz_ingest_by_position(cancer_store: Path, tmp_path: Path) -> None:
    table = more_rows(700, seed=5)
    names = [c for c in breast_cancer_table().column_names if c != "diagnosis"]
    x = np.stack([table[c].to_numpy() for c in names], axis=1)
    y = table["diagnosis"].to_numpy(zero_copy_only=False).astype(str)
    path = tmp_path / "more.npz"
    np.savez_compressed(path, x=x, y=y)
    run = skqk(cancer_store, "ingest", str(path), "--chunk-rows", "256")
    assert run.returncode == 0, run.stdout + run.stderr
    assert sample_count(cancer_store) == N_INIT + 700
