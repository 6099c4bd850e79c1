"""`skqk init` / `skqk retrain` against the SQL store, and settings (API key file)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from app.settings import Settings, resolve_api_key
from app.storage import Store
from tests.helpers.server import REPO, fast_env


def _skqk(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=240, check=False)


def test_init_registers_version_1_in_the_store_then_retrain(tmp_path: Path) -> None:
    env = fast_env(tmp_path)
    first = _skqk(env, "init", "--dataset", "digits", "--arch", "mlp:32", "--epochs", "3")
    assert first.returncode == 0, first.stdout + first.stderr
    store = Store(f"sqlite:///{tmp_path / 'skqk.db'}")
    try:
        assert store.active_version() == 1
        assert store.sample_count() == 1797  # the data set is stored as the "old data"
        v1 = store.get_version(1, weights=False)
        assert v1.mode == "full" and v1.metrics["dataset"] == "digits"
        assert v1.architecture["name"] == "mlp:64-32-10"
        again = _skqk(env, "init", "--dataset", "digits", "--epochs", "1")
        assert again.returncode == 1 and "--force" in again.stdout
        noop = _skqk(env, "init", "--if-empty")
        assert noop.returncode == 0 and store.latest_version() == 1
        retrain = _skqk(env, "retrain", "--mode", "qk", "--epochs", "2", "--tolerance", "1.0",
                        "--force")  # nothing new since init: forced
        assert retrain.returncode == 0, retrain.stdout + retrain.stderr
        assert "promoted" in retrain.stdout and store.active_version() == 2
        assert store.get_version(2, weights=False).parent == 1
        job = store.list_jobs()[0]
        assert job.status == "succeeded" and job.runner == "cli"
        bad = _skqk(env, "retrain", "--mode", "sideways")
        assert bad.returncode == 2
    finally:
        store.dispose()


def test_api_key_is_generated_once_with_private_permissions(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_key=None)
    key = resolve_api_key(settings)
    assert len(key) >= 32
    mode = stat.S_IMODE(os.stat(settings.api_key_file).st_mode)
    assert mode == 0o600
    assert resolve_api_key(settings) == key  # stable across restarts
    assert resolve_api_key(Settings(data_dir=tmp_path, api_key="chosen")) == "chosen"


def test_settings_read_the_skqk_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SKQK_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SKQK_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("SKQK_DATABASE_URL", "postgresql+psycopg://u@h/db")
    s = Settings()
    assert s.max_batch_size == 7 and s.data_dir == tmp_path
    assert s.resolved_database_url == "postgresql+psycopg://u@h/db"
    monkeypatch.delenv("SKQK_DATABASE_URL")
    assert Settings().resolved_database_url == f"sqlite:///{(tmp_path / 'skqk.db').resolve()}"
    assert Settings().redis_url is None  # embedded mode by default
