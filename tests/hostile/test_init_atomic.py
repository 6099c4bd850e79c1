"""``skqk init --data`` is all or nothing (issue 20, item 6): a run that fails after its rows
were stored (too few rows for the holdout, Ctrl-C while training, an architecture that does
not fit) leaves no row behind, and the same command run again afterwards stores the file
once. Real ``skqk`` subprocesses on a real SQLite store."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.helpers.server import REPO, fast_env
from tests.owndata.conftest import sample_count, skqk

FAST = ("--arch", "mlp:16", "--epochs", "2", "--device", "cpu")


def _stored(data_dir: Path) -> int:
    """Rows stored so far (0 while the CLI is still creating the store)."""
    from sqlalchemy.exc import OperationalError

    try:
        return sample_count(data_dir) if (data_dir / "skqk.db").exists() else 0
    except OperationalError:
        return 0


def _npz(path: Path, rows: int) -> Path:
    gen = np.random.default_rng(1)
    np.savez(path, x=gen.random((rows, 4)).astype(np.float32), y=np.arange(rows) % 3)
    return path


def test_too_few_rows_leaves_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    run = skqk(data_dir, "init", "--data", str(_npz(tmp_path / "few.npz", 30)), "--label-column", "y", *FAST)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "too few" in " ".join(run.stdout.split())
    assert sample_count(data_dir) == 0


def test_arch_that_does_not_fit_leaves_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    run = skqk(data_dir, "init", "--data", str(_npz(tmp_path / "d.npz", 600)), "--label-column", "y",
               "--arch", "lenet5", "--epochs", "1", "--device", "cpu")
    assert run.returncode == 2, run.stdout + run.stderr
    assert sample_count(data_dir) == 0


def test_ctrl_c_during_training_leaves_nothing_and_a_rerun_stores_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    path = _npz(tmp_path / "d.npz", 3000)
    env = fast_env(data_dir)
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "init", "--data", str(path),
                             "--label-column", "y", "--arch", "mlp:256-256", "--epochs", "2000",
                             "--device", "cpu"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while _stored(data_dir) < 3000:  # rows stored
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.0)  # training now
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out
    assert sample_count(data_dir) == 0, out

    again = skqk(data_dir, "init", "--data", str(path), "--label-column", "y", *FAST)
    assert again.returncode == 0, again.stdout + again.stderr
    assert sample_count(data_dir) == 3000
