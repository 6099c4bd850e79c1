"""Start real ``skqk serve`` processes for tests (reusable by the distributed tests).

``ServerProcess(data_dir, env).start()`` runs ``python -m app.cli serve`` on a free
127.0.0.1 port in its own process group, waits for ``/v2/health/ready`` and keeps the log.
``kill()`` sends SIGKILL to the server process only (crash test); ``stop()`` ends the whole
group (server + any retrain child it spawned).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-admin-key"

# Small and fast: digits, a narrow MLP, few epochs, quick polling.
FAST_ENV = {
    "SKQK_API_KEY": API_KEY,
    "SKQK_BOOTSTRAP_DATASET": "digits",
    "SKQK_BOOTSTRAP_ARCH": "mlp:64-64",
    "SKQK_BOOTSTRAP_EPOCHS": "6",
    "SKQK_RETRAIN_EPOCHS": "4",
    "SKQK_POLL_INTERVAL_S": "0.5",
    "SKQK_PROMOTION_TOLERANCE": "0.05",
    "SKQK_DEVICE": "cpu",
    "SKQK_TORCH_THREADS": "1",
    "SKQK_RETRAIN_THREADS": "1",
    "SKQK_LOG_LEVEL": "info",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fast_env(data_dir: Path, **overrides: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKQK_")}
    env.update(FAST_ENV)
    env["SKQK_DATA_DIR"] = str(data_dir)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def copy_store(template_dir: Path, data_dir: Path) -> Path:
    """Copy a bootstrapped SQLite data dir (checkpointed, so the .db file alone is complete)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(template_dir / "skqk.db", data_dir / "skqk.db")
    return data_dir


class ServerProcess:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, port: int | None = None,
                 extra_args: tuple[str, ...] = (), command: list[str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.env = env or fast_env(self.data_dir)
        self.port = port or free_port()
        self.extra_args = extra_args
        self.command = command  # default: ``python -m app.cli serve`` on this port
        self.log_path = self.data_dir / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def start(self, ready_timeout: float = 120.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            self.command or [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1",
                             "--port", str(self.port), *self.extra_args],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.wait_ready(ready_timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server on {self.url} not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server process itself (a crash); its group is cleaned up by stop()."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the server's pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)  # leftover children of this server only

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_job(client: httpx.Client, job_id: str, timeout: float = 180.0) -> dict[str, Any]:
    """Poll ``GET /retrain/{job_id}`` until the job has finished; its last status body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/retrain/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish within {timeout}s")
