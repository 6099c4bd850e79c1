"""The distributed deployment on real services: a private redis-server, a fresh Postgres
database, a real Celery worker and two real API replicas, each started with the very
command docker-compose.yml gives its service."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from tests.compose import compose_command
from tests.helpers.pg import temporary_database
from tests.helpers.server import API_KEY, REPO, ServerProcess, fast_env, free_port

LEASE_S = 4  # the worker's lock TTL: a killed worker's lock is gone within this
REPUBLISH_S = 4  # a queued job whose message no worker started is published again after this


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1,
               what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError, redis.RedisError):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A real redis-server of our own, so the tests can stop and restart it at will."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_until(client.ping, 10, what="redis-server to answer")
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@dataclass
class Process:
    """A CLI process in its own group, logging to a file."""

    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Process:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill_group(signal.SIGTERM)
            if self.proc.poll() is None:
                self.kill_group(signal.SIGKILL)


@dataclass
class Deployment:
    redis: RedisServer
    env: dict[str, str]
    workdir: Path
    replicas: list[ServerProcess] = field(default_factory=list)
    workers: list[Process] = field(default_factory=list)

    @property
    def pause_file(self) -> Path:
        """While this file exists, the workers' retrains hold after each epoch (a test knob)."""
        return Path(self.env["SKQK_RETRAIN_TEST_PAUSE_FILE"])

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()

    def running_worker(self) -> Process:
        """A live worker: the last one started if it still runs, else a new one."""
        if self.workers and self.workers[-1].proc is not None and self.workers[-1].proc.poll() is None:
            return self.workers[-1]
        return self.start_worker()

    def start_worker(self, **overrides: str) -> Process:
        env = {**self.env, **overrides}
        worker = Process(compose_command("worker"), env,
                         self.workdir / f"worker{len(self.workers)}.log").start()
        self.workers.append(worker)
        wait_until(lambda: "ready." in worker.log(), 60, 0.2, what=f"celery worker ready:\n{worker.log()}")
        return worker

    def start_replica(self) -> ServerProcess:
        port = free_port()
        cmd = compose_command("api", host="127.0.0.1", port=str(port))
        replica = ServerProcess(self.workdir / f"replica{len(self.replicas)}", dict(self.env), port=port,
                                command=cmd)
        self.replicas.append(replica)
        replica.start(ready_timeout=120)
        # Ready answers from one uvicorn worker; wait until every worker of the replica serves.
        probe = {"inputs": [[0.0] * 64]}
        wait_until(lambda: all(httpx.post(f"{replica.url}/predict", json=probe, timeout=5).status_code == 200
                               for _ in range(16)), 120, 0.5, what=f"all workers of {replica.url} ready")
        return replica

    def close(self) -> None:
        for p in self.workers:
            p.stop()
        for r in self.replicas:
            r.stop()
        self.redis.stop()


@contextlib.contextmanager
def initialised_deployment(workdir: Path, db_prefix: str, init_epochs: int,
                           **env_overrides: object) -> Iterator[Deployment]:
    """A private Redis, a fresh Postgres database and an initialised store (``skqk init``, as
    compose runs it); no worker or replica yet. Everything is torn down on exit."""
    redis_server = RedisServer(workdir)
    redis_server.start()
    with temporary_database(prefix=db_prefix) as db_url:
        env = fast_env(workdir, SKQK_DATABASE_URL=db_url, SKQK_REDIS_URL=redis_server.url,
                       **env_overrides)
        dep = Deployment(redis_server, env, workdir)
        try:
            init = subprocess.run(compose_command("init", epochs=str(init_epochs)), cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=300, check=False)
            assert init.returncode == 0, init.stdout + init.stderr
            yield dep
        finally:
            dep.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("distributed")
    with initialised_deployment(
            workdir, "skqk_dist", 8, SKQK_RETRAIN_LEASE_S=LEASE_S, SKQK_RETRAIN_QUEUE_TIMEOUT_S=120,
            SKQK_RETRAIN_REPUBLISH_S=REPUBLISH_S, SKQK_RETRAIN_TEST_PAUSE_FILE=workdir / "pause-retrains",
            # Long poll: a replica that swaps within a second was told over pub/sub.
            SKQK_POLL_INTERVAL_S=30) as dep:
        dep.start_worker()
        dep.start_replica()
        dep.start_replica()
        yield dep


def admin_headers() -> dict[str, str]:
    return {"X-API-Key": API_KEY}
