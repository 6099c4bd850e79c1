"""Distributed retrains on-call can trust: real Redis, Postgres, Celery worker and API replica.

- no worker consumes the queue → ``POST /retrain`` is a 503 naming the queue at once (not a
  202 whose job waits out the 10-minute queue timeout holding the lock), and nothing is
  written; a worker started → 202, and ``GET /retrain/{id}`` says how long the job waited and
  how many workers are online; a worker stopped → 503 again, at once;
- the job a worker ran shows in the replica's ``/metrics`` (read from the job table).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import redis
from sklearn.datasets import load_digits

from app.distributed import LOCK_NAME
from app.storage import Store
from tests.helpers.server import ServerProcess
from tests.integration.conftest import Deployment, admin_headers, initialised_deployment, wait_until

pytestmark = pytest.mark.integration

DIGITS = load_digits()
FEATURES = (DIGITS.data / 16.0).astype(np.float32)


@pytest.fixture(scope="module")
def small_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One replica (one uvicorn process), workers started by the tests."""
    workdir = tmp_path_factory.mktemp("workers")
    with initialised_deployment(workdir, "skqk_wrk", 2, SKQK_RETRAIN_LEASE_S=4,
                                SKQK_RETRAIN_QUEUE_TIMEOUT_S=120) as dep:
        replica = ServerProcess(workdir / "replica", dict(dep.env))
        dep.replicas.append(replica)
        replica.start(ready_timeout=120)
        yield dep


def _post_retrain(client: httpx.Client, **body: object) -> httpx.Response:
    return client.post("/retrain", json=body, headers=admin_headers())


def _jobs(dep: Deployment) -> int:
    store = Store(dep.env["SKQK_DATABASE_URL"])
    try:
        return len(store.list_jobs())
    finally:
        store.dispose()


def test_no_worker_is_a_503_naming_the_queue_then_a_worker_takes_the_job(small_deployment: Deployment):
    dep = small_deployment
    (replica,) = dep.replicas
    with replica.client() as c:
        samples = [{"features": FEATURES[i].tolist(), "label": int(DIGITS.target[i])} for i in range(10)]
        assert c.post("/ingest", json={"samples": samples}).status_code == 200

        r = _post_retrain(c)  # no worker was ever started
        assert r.status_code == 503, r.text
        assert "no worker consumes queue 'gpu'" in r.json()["error"], r.text
        assert "skqk worker" in r.json()["error"] and r.headers["retry-after"]
        assert _jobs(dep) == 0  # nothing queued for nobody, the lock untaken
        assert redis.Redis(port=dep.redis.port).get(LOCK_NAME) is None

        dep.start_worker()  # ready: it announced itself, so the very next POST is accepted
        r = _post_retrain(c)
        assert r.status_code == 202 and r.json()["mode"] == "auto", r.text
        job_id = r.json()["job_id"]
        first = c.get(f"/retrain/{job_id}").json()
        assert first["workers_online"] == 1, first
        assert isinstance(first["queued_for_s"], float) and first["queued_for_s"] >= 0

        def finished() -> dict | None:
            job = c.get(f"/retrain/{job_id}").json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        job = wait_until(finished, 180, 0.1, what=f"job {job_id} to finish")
        assert job["status"] == "succeeded", job
        assert job["runner"] == "celery" and job["result"]["mode"] == "qk"
        assert "not enough new data to judge" in job["result"]["mode_reason"]
        started = job["queued_for_s"]  # frozen once the worker started it
        assert started >= 0 and c.get(f"/retrain/{job_id}").json()["queued_for_s"] == started

        # the worker ran it; this replica's /metrics still counts it (the job table)
        text = c.get("/metrics").text
        outcome = "promoted" if job["result"]["promoted"] else "rejected"
        jobs = rf'^skqk_retrain_jobs_total{{mode="qk",outcome="{outcome}"}} 1\.0$'
        assert re.search(jobs, text, re.M), text
        success = float(re.search(r"^skqk_retrain_last_success_timestamp_seconds (\S+)$", text, re.M)[1])
        assert success > 0

        dep.stop_workers()  # a clean stop leaves at once: no waiting for the heartbeat to expire
        r = _post_retrain(c, force=True)
        assert r.status_code == 503 and "no worker consumes queue 'gpu'" in r.json()["error"], r.text
        assert c.get(f"/retrain/{job_id}").json()["workers_online"] in (0, 1)  # remembered ≤ 2 s
