"""Reliability under faults, measured on real processes: what docs/RELIABILITY.md promises.

Usage: ``python bench/reliability.py [--rounds 5] [--swaps 20] [--only durability,swaps,…]``

- **durability**: four clients ingest with idempotency keys while the server is SIGKILLed at
  a random moment, ``--rounds`` times, on SQLite and on Postgres. After each crash the store is
  read directly: every acknowledged batch must be there with all its rows.
- **swaps**: four clients call ``/predict`` and v2 infer while versions are activated
  ``--swaps`` times; counts failed requests and answers from a version that was not active at
  any moment of the request.
- **redis**: distributed mode; the private Redis is SIGKILLed and restarted empty (no
  persistence); time until ``POST /retrain`` is accepted again and the job succeeds.
- **worker**: the worker is SIGKILLed mid-retrain and a new one started; time until the job ends.
- **postgres**: a private Postgres cluster is frozen (SIGSTOP) and thawed; time for ``/ingest``
  to answer 503, whether ``/predict`` keeps answering, and time to recover after SIGCONT.

Results go to the ``reliability`` section of docs/BENCHMARKS.md and are quoted in
docs/RELIABILITY.md. Timings are medians of the rounds; every round is listed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import machine_info, markdown_table, write_section
from tests.helpers.pg import temporary_database
from tests.helpers.server import API_KEY, ServerProcess, fast_env, wait_job
from tests.integration.conftest import RedisServer, initialised_deployment

ADMIN = {"X-API-Key": API_KEY}


# ---- durability: kill -9 under ingest load ---------------------------------------------------
@dataclass
class IngestLoad:
    """Clients that ingest keyed batches until told to stop; remembers what was acknowledged."""

    url: str
    clients: int = 4
    acked: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _loop(self, worker: int, round_id: int) -> None:
        rng = np.random.default_rng(1000 * round_id + worker)
        with httpx.Client(base_url=self.url, timeout=10) as c:
            i = 0
            while not self._stop.is_set():
                n = int(rng.integers(1, 64))
                x = rng.random((n, 64), dtype=np.float32).round(4)
                samples = [{"features": row.tolist(), "label": int(rng.integers(0, 10))} for row in x]
                key = f"r{round_id}-w{worker}-{i}"
                i += 1
                try:
                    r = c.post("/ingest", json={"samples": samples, "idempotency_key": key})
                except httpx.HTTPError:
                    self.errors += 1
                    return  # the server died mid-request: not acknowledged
                if r.status_code == 200:
                    self.acked[key] = n

    def start(self, round_id: int) -> None:
        self._threads = [threading.Thread(target=self._loop, args=(w, round_id), daemon=True)
                         for w in range(self.clients)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


def stored_counts(database_url: str, keys: list[str]) -> dict[str, int]:
    """Rows stored per idempotency key, read straight from the store."""
    from sqlalchemy import func, select

    from app.storage import Store
    from app.storage.schema import ingest_batches, samples

    store = Store(database_url)
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(
                select(ingest_batches.c.idempotency_key, func.count(samples.c.id))
                .join(samples, samples.c.batch_id == ingest_batches.c.id)
                .where(ingest_batches.c.idempotency_key.in_(keys))
                .group_by(ingest_batches.c.idempotency_key)).all()
    finally:
        store.dispose()
    return {k: int(n) for k, n in rows}


def durability(work: Path, backend: str, database_url: str | None, rounds: int) -> list[list[object]]:
    data_dir = work / f"durability-{backend}"
    env = fast_env(data_dir, **({"SKQK_DATABASE_URL": database_url} if database_url else {}))
    url = database_url or f"sqlite:///{data_dir / 'skqk.db'}"
    server = ServerProcess(data_dir, env)
    rows: list[list[object]] = []
    try:
        for r in range(rounds):
            server.start(ready_timeout=300)
            load = IngestLoad(server.url)
            load.start(r)
            time.sleep(random.Random(r).uniform(1.0, 4.0))
            server.kill()  # SIGKILL while the clients keep sending
            load.stop()
            server.stop()
            stored = stored_counts(url, list(load.acked))
            lost = [k for k, n in load.acked.items() if stored.get(k, 0) != n]
            acked_rows = sum(load.acked.values())
            found_rows = sum(min(stored.get(k, 0), n) for k, n in load.acked.items())
            rows.append([backend, r + 1, len(load.acked), acked_rows, found_rows, len(lost)])
            print(f"durability {backend} round {r + 1}: {len(load.acked)} acked batches "
                  f"({acked_rows} rows), {found_rows} found, {len(lost)} lost", flush=True)
    finally:
        server.stop()
    return rows


# ---- swaps: hot swaps under predict load -----------------------------------------------------
def swaps(work: Path, n_swaps: int) -> dict[str, object]:
    data_dir = work / "swaps"
    server = ServerProcess(data_dir, fast_env(data_dir)).start(ready_timeout=300)
    try:
        with server.client(timeout=300) as c:
            _ingest_some(c, 0)
            result = wait_job(c, _accept(c)[0])
            assert result["status"] == "succeeded", result
            versions = sorted(v["version"] for v in c.get("/models").json())[-2:]
            c.post(f"/models/{versions[0]}/activate", headers=ADMIN).raise_for_status()
        # (time, version) of each activation: a version counts as active from just before its
        # activation call until the next activation call returned.
        timeline: list[tuple[float, float, int]] = [(0.0, time.monotonic(), versions[0])]
        answers: list[tuple[float, float, int]] = []
        failures: list[str] = []
        stop = threading.Event()
        x = np.random.default_rng(0).random((1, 64), dtype=np.float32).tolist()

        def client_loop(v2: bool) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        if v2:
                            r = c.post("/v2/models/skqk/infer", json={"inputs": [
                                {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x[0]}]})
                        else:
                            r = c.post("/predict", json={"inputs": x})
                    except httpx.HTTPError as exc:
                        failures.append(type(exc).__name__)
                        continue
                    if r.status_code != 200:
                        failures.append(f"{r.status_code}: {r.text[:100]}")
                        continue
                    answers.append((t0, time.monotonic(), int(r.json()["model_version"])))

        threads = [threading.Thread(target=client_loop, args=(i % 2 == 1,)) for i in range(4)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=server.url, timeout=60) as admin:
            for i in range(n_swaps):
                time.sleep(0.5)
                version = versions[(i + 1) % 2]
                t0 = time.monotonic()
                admin.post(f"/models/{version}/activate", headers=ADMIN).raise_for_status()
                timeline.append((t0, time.monotonic(), version))
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        server.stop()

    def possible(t0: float, t1: float, version: int) -> bool:
        for i, (start, _done, v) in enumerate(timeline):
            until = timeline[i + 1][1] if i + 1 < len(timeline) else float("inf")
            if v == version and start <= t1 and until >= t0:
                return True
        return False

    wrong = sum(not possible(*a) for a in answers)
    return {"requests": len(answers) + len(failures), "failed": len(failures), "wrong_version": wrong,
            "swaps": n_swaps, "examples": failures[:3]}


# ---- recovery: Redis, worker and Postgres loss ----------------------------------------------
LEASE_S = 4  # the worker's lock TTL in the distributed runs: a dead worker is noticed within it


def _ingest_some(client: httpx.Client, seed: int, n: int = 20) -> None:
    """New rows, so a retrain has something new to train on."""
    rng = np.random.default_rng(seed)
    samples = [{"features": rng.random(64).round(4).tolist(), "label": int(rng.integers(0, 10))}
               for _ in range(n)]
    client.post("/ingest", json={"samples": samples}).raise_for_status()


def _accept(client: httpx.Client, mode: str = "qk", timeout: float = 120) -> tuple[str, float]:
    """POST /retrain until it is accepted (a lock may still be settling): (job id, seconds)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            r = client.post("/retrain", json={"mode": mode}, headers=ADMIN)
            if r.status_code == 202:
                return r.json()["job_id"], time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"POST /retrain not accepted within {timeout}s")


def distributed(work: Path, rounds: int) -> list[list[object]]:
    """Redis SIGKILL + empty restart, and worker SIGKILL mid-retrain, on a real deployment."""
    rows: list[list[object]] = []
    workdir = work / "distributed"
    workdir.mkdir()
    with initialised_deployment(workdir, "skqk_rel_dist", 8, SKQK_RETRAIN_LEASE_S=LEASE_S,
                                SKQK_RETRAIN_REPUBLISH_S=10) as dep:
        redis_server = dep.redis
        # long full retrains, so the worker can be killed in the middle of one
        dep.start_worker(SKQK_RETRAIN_EPOCHS="400", SKQK_RETRAIN_PATIENCE="400")
        replica = dep.start_replica()
        with replica.client() as c:
            for r in range(rounds):
                # Redis: SIGKILL, restart empty; serving must not notice, retrains come back.
                _ingest_some(c, 10 * r)
                restarted: list[float] = []
                failures = _predict_failures_during(
                    replica.url, lambda out=restarted: _restart_redis(redis_server, out), settle_s=0.0)
                job_id, _ = _accept(c)
                accept_s = time.monotonic() - restarted[0]
                done = wait_job(c, job_id)
                rows.append(["Redis SIGKILL + empty restart", r + 1,
                             f"POST /retrain accepted {accept_s:.2f} s after the restart; the job "
                             f"{done['status']} {time.monotonic() - restarted[0]:.1f} s after it",
                             failures])
                print("redis", rows[-1], flush=True)

                # Worker: SIGKILL mid-retrain, then a new worker.
                _ingest_some(c, 10 * r + 1)
                job_id, _ = _accept(c, "full")
                timed_until(lambda j=job_id: (c.get(f"/retrain/{j}").json()["progress"]
                                              .get("epoch") or 0) >= 2, 120, 0.1)
                t_kill = time.monotonic()
                dep.workers[-1].kill_group()
                dep.start_worker(SKQK_RETRAIN_EPOCHS="400", SKQK_RETRAIN_PATIENCE="400")
                first = wait_job(c, job_id, timeout=120)
                ended_s = time.monotonic() - t_kill
                _ingest_some(c, 10 * r + 2)
                job2, accept2_s = _accept(c)
                second = wait_job(c, job2)
                rows.append(["worker SIGKILL mid-retrain, new worker started", r + 1,
                             f"killed job ended {first['status']} {ended_s:.1f} s after the kill "
                             f"(lease {LEASE_S} s); next job accepted after {accept2_s:.1f} s, "
                             f"{second['status']} {time.monotonic() - t_kill:.1f} s after the kill",
                             0])
                print("worker", rows[-1], flush=True)
    return rows


def _restart_redis(server: RedisServer, restarted_at: list[float]) -> None:
    """SIGKILL the private Redis and start it again, empty (it keeps nothing on disk)."""
    server.stop()
    server.start()
    restarted_at.append(time.monotonic())


def _predict_failures_during(url: str, fault: Callable[[], object], settle_s: float = 2.0) -> int:
    """Failed /predict calls from one client while ``fault`` runs (and ``settle_s`` after)."""
    failures = 0
    stop = threading.Event()

    def loop() -> None:
        nonlocal failures
        with httpx.Client(base_url=url, timeout=10) as c:
            while not stop.is_set():
                try:
                    if c.post("/predict", json={"inputs": [[0.5] * 64]}).status_code != 200:
                        failures += 1
                except httpx.HTTPError:
                    failures += 1

    thread = threading.Thread(target=loop)
    thread.start()
    fault()
    time.sleep(settle_s)
    stop.set()
    thread.join(30)
    return failures


def postgres_freeze(work: Path, rounds: int, freeze_s: float = 5.0) -> list[list[object]]:
    """A private Postgres frozen (SIGSTOP) for ``freeze_s``: time to 503, serving, recovery."""
    from tests.helpers.private_pg import PrivateCluster, pg_bin_dir

    bin_dir = pg_bin_dir()
    if bin_dir is None:
        print("postgres: no server binaries; skipped", flush=True)
        return []
    cluster = PrivateCluster(bin_dir).start()
    data_dir = work / "pg-freeze"
    server = ServerProcess(data_dir, fast_env(data_dir, SKQK_DATABASE_URL=cluster.url))
    rows: list[list[object]] = []
    try:
        server.start(ready_timeout=300)
        with server.client(timeout=60) as c:
            for r in range(rounds):
                cluster.freeze()
                t0 = time.monotonic()
                answer = c.post("/ingest", json={"samples": [{"features": [0.5] * 64, "label": 1}]})
                to_503 = time.monotonic() - t0
                predict_failures = _predict_failures_during(server.url, lambda: None, freeze_s)
                cluster.thaw()
                t1 = time.monotonic()
                recover = timed_until(lambda: c.post("/ingest", json={"samples": [
                    {"features": [0.5] * 64, "label": 1}]}).status_code == 200, 60, 0.05)
                rows.append(["Postgres frozen (SIGSTOP) then thawed", r + 1,
                             f"/ingest {answer.status_code} after {to_503:.2f} s; ingest back "
                             f"{recover:.2f} s after SIGCONT", predict_failures])
                print("postgres", rows[-1], f"{time.monotonic() - t1:.2f}", flush=True)
    finally:
        server.stop()
        cluster.stop()
    return rows


# ---- driver ----------------------------------------------------------------------------------
def timed_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Seconds until ``predicate`` holds (raises after ``timeout``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if predicate():
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"not within {timeout}s")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


PARTS = ("durability", "swaps", "distributed", "postgres")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    only = set(args.only.split(","))
    sections: list[str] = []
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="skqk-reliability-")))
        if "durability" in only:
            pg_url = stack.enter_context(temporary_database(prefix="skqk_rel"))
            rows = durability(work, "sqlite", None, args.rounds)
            rows += durability(work, "postgres", pg_url, args.rounds)
            sections.append("### Acknowledged ingests after SIGKILL under load\n\n"
                            "Four clients ingest keyed batches of 1–63 rows; the server is SIGKILLed "
                            "1–4 s into each round, then the store is read directly.\n\n"
                            + markdown_table(["store", "round", "acked batches", "acked rows",
                                              "acked rows found", "lost batches"], rows))
        if "swaps" in only:
            s = swaps(work, args.swaps)
            print(f"swaps: {s}", flush=True)
            sections.append("### Hot swaps under load\n\n"
                            f"Four clients (/predict and v2 infer alternating) during {s['swaps']} "
                            "activations, 0.5 s apart.\n\n"
                            + markdown_table(["requests", "failed", "answered by a version never "
                                              "active during the request"],
                                             [[s["requests"], s["failed"], s["wrong_version"]]]))
        recovery: list[list[object]] = []
        if "distributed" in only:
            recovery += distributed(work, args.rounds)
        if "postgres" in only:
            recovery += postgres_freeze(work, args.rounds)
        if recovery:
            sections.append("### Recovery after losing Redis, a worker or Postgres\n\n"
                            "One replica (plus one Celery worker in distributed mode). Failed "
                            "/predict calls are counted from one client during the fault.\n\n"
                            + markdown_table(["fault", "round", "recovery", "failed /predict"],
                                             recovery))
    if not args.no_write:
        write_section("reliability", "## Reliability under faults (bench/reliability.py)\n\n"
                      f"Machine: {machine_info()}\n\n" + "\n\n".join(sections))


if __name__ == "__main__":
    main()
