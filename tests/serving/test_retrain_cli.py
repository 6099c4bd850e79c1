"""`skqk retrain` (in-process) exit codes for cron: 0 promoted, 3 not promoted, 4 nothing new, 1 failed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from app.storage import Store
from tests.helpers.server import REPO, copy_store, fast_env


def _skqk(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", "retrain", *args], cwd=REPO,
                          env=fast_env(data_dir, **env), text=True, capture_output=True, timeout=300,
                          check=False)


def _versions(data_dir: Path) -> tuple[int | None, int | None]:
    store = Store(f"sqlite:///{data_dir / 'skqk.db'}")
    try:
        return store.latest_version(), store.active_version()
    finally:
        store.dispose()


def test_exit_codes(template_data_dir: Path, tmp_path: Path) -> None:
    data_dir = copy_store(template_data_dir, tmp_path / "data")
    out = _skqk(data_dir)  # nothing since the bootstrap: no job, no version
    assert out.returncode == 4, out.stdout + out.stderr
    assert "nothing to do" in out.stdout and "--force" in out.stdout
    assert _versions(data_dir) == (1, 1)

    # a candidate trained into the ground (one full epoch at lr 10): the gate rejects it
    out = _skqk(data_dir, "--force", "--mode", "full", "--epochs", "1", SKQK_RETRAIN_LR="10")
    assert out.returncode == 3, out.stdout + out.stderr
    assert "not promoted" in out.stdout and "rejected by the gate" in out.stdout
    assert _versions(data_dir) == (2, 1)

    out = _skqk(data_dir, "--force", SKQK_MIN_HOLDOUT="100000")  # the job fails: too few rows
    assert out.returncode == 1, out.stdout + out.stderr
    assert "not enough samples" in out.stdout

    digits = load_digits()
    store = Store(f"sqlite:///{data_dir / 'skqk.db'}")
    try:
        store.ingest((digits.data[:1] / 16.0).astype(np.float32), digits.target[:1])
    finally:
        store.dispose()
    out = _skqk(data_dir)  # one new row, mode auto
    assert out.returncode == 0, out.stdout + out.stderr
    assert "mode qk: auto: qk (not enough new data to judge drift: 1 new samples" in out.stdout, out.stdout
    assert "features: " in out.stdout and "readout refit: " in out.stdout
    assert "epoch" not in out.stdout.split("promoted")[0]  # a QK retrain has no epochs
    assert _versions(data_dir) == (3, 3)
