"""Helpers for the own-data tests: data files written like a user would, the `skqk` CLI as a
real subprocess, and small training settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.server import REPO, fast_env

INIT_FAST = ("--arch", "mlp:32-32", "--epochs", "8", "--device", "cpu")


def skqk(data_dir: Path, *args: str, timeout: float = 300, **env: Any) -> subprocess.CompletedProcess[str]:
    """Run ``python -m app.cli ARGS`` against ``data_dir``'s store; output captured as text."""
    columns = env.pop("COLUMNS", "200")  # None: leave it unset (rich's default, 80, when not a terminal)
    environ = fast_env(data_dir, **{f"SKQK_{k.upper()}": v for k, v in env.items()})
    environ.pop("COLUMNS", None)
    if columns is not None:
        environ["COLUMNS"] = columns  # rich wraps long messages at the terminal width
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=timeout, check=False)


def breast_cancer_table():
    """sklearn's breast cancer data as a user would have it: named columns, text labels."""
    import pyarrow as pa
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    columns = {name: d.data[:, i] for i, name in enumerate(d.feature_names)}
    columns["diagnosis"] = np.asarray(d.target_names)[d.target]
    return pa.table(columns)


def regression_table(n: int, seed: int, shift: float = 0.0):
    """Two targets of six features (a piecewise-linear truth) plus noise; ``shift`` moves both."""
    import pyarrow as pa

    gen = np.random.default_rng(seed)
    x = gen.normal(0, 1, (n, 6))
    y1 = 10 + 3 * np.abs(x[:, 0]) - 2 * x[:, 1] * (x[:, 2] > 0) + 0.1 * gen.standard_normal(n) + shift
    y2 = -5 + 2 * x[:, 3] + np.maximum(x[:, 4], 0) + 0.1 * gen.standard_normal(n) + shift
    columns = {f"sensor_{i}": x[:, i] * 10 + 50 for i in range(6)}
    columns["load"], columns["temp"] = y1, y2
    return pa.table(columns)


def write_csv(table, path: Path) -> Path:
    import pyarrow.csv as pacsv

    pacsv.write_csv(table, path)
    return path


def write_parquet(table, path: Path) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(table, path)
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def sample_count(data_dir: Path) -> int:
    from app.storage import Store

    store = Store(f"sqlite:///{data_dir / 'skqk.db'}")
    try:
        return store.sample_count()
    finally:
        store.dispose()
