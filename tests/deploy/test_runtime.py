"""The container roles on real processes, configured the way docker-compose.yml configures them:
secrets as files (SKQK_API_KEY_FILE, SKQK_DATABASE_URL_FILE) and deploy/healthcheck.py, the
image's `skqk-healthcheck`, against a real `skqk serve` and a real Celery `skqk worker`."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.compose import compose_command
from tests.helpers.server import REPO, ServerProcess, copy_store, fast_env, free_port

HEALTHCHECK = [sys.executable, str(REPO / "deploy" / "healthcheck.py")]
FILE_KEY = "key-from-a-secret-file"


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HEALTHCHECK, *args], cwd="/", env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def secret_env(tmp: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    """fast_env with the key and the database URL only as files, as compose passes them."""
    (tmp / "api_key").write_text(f"{FILE_KEY}\n")
    (tmp / "database_url").write_text(f"sqlite:///{data_dir / 'skqk.db'}\n")
    env = fast_env(data_dir, SKQK_API_KEY_FILE=tmp / "api_key", SKQK_DATABASE_URL_FILE=tmp / "database_url",
                   **extra)
    del env["SKQK_API_KEY"]
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, template_data_dir: Path) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("secrets")
    data_dir = copy_store(template_data_dir, tmp_path_factory.mktemp("data"))
    db = data_dir / "skqk.db"
    moved = tmp / "store.db"  # only the URL file can lead the server to the store
    db.rename(moved)
    env = secret_env(tmp, data_dir)
    (tmp / "database_url").write_text(f"sqlite:///{moved}\n")
    srv = ServerProcess(data_dir, env)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private redis-server and a real `skqk worker` (compose's command); yields its env."""
    tmp = tmp_path_factory.mktemp("worker")
    port = free_port()
    broker = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = secret_env(tmp, tmp, SKQK_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    log = tmp / "worker.log"
    proc = None
    try:
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with open(log, "ab") as out:
            proc = subprocess.Popen(compose_command("worker"), cwd=REPO, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while "ready." not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, f"worker not ready:\n{log.read_text(errors='replace')}"
            time.sleep(0.2)
        yield env
    finally:
        for p in (proc, broker):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)


def test_server_takes_key_and_store_from_secret_files(server: ServerProcess) -> None:
    with server.client() as c:
        assert c.get("/models").json()[0]["version"] == 1  # the store named by the URL file
        # 404 (an unknown version) is past the key check; the wrong key or none is 401
        assert c.post("/models/999/activate", headers={"X-API-Key": FILE_KEY}).status_code == 404
        assert c.post("/models/999/activate", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.post("/models/999/activate").status_code == 401
    assert not (server.data_dir / "api_key").exists()  # no key was generated beside it


def test_serve_health_check(server: ServerProcess) -> None:
    ok = healthcheck("serve", "--port", str(server.port))
    assert ok.returncode == 0, ok.stderr
    down = healthcheck("serve", "--port", str(free_port()), "--timeout", "2")
    assert down.returncode == 1 and "unhealthy" in down.stderr and "/v2/health/ready" in down.stderr


def test_worker_health_check_pings_its_own_node(worker: dict[str, str]) -> None:
    ok = healthcheck("worker", env=worker)
    assert ok.returncode == 0, ok.stderr
    other = healthcheck("worker", "--node", "celery@no-such-host", "--timeout", "2", env=worker)
    assert other.returncode == 1 and "celery@no-such-host" in other.stderr


def test_one_shot_roles_are_healthy() -> None:
    # `skqk init` & co. have nothing to probe; here PID 1 is no skqk command, so auto means that too
    assert healthcheck("other").returncode == 0
    assert healthcheck().returncode == 0

