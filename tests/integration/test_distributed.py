"""Distributed path end to end: real Redis, Postgres, Celery worker and two API replicas."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from app.storage import Store
from tests.integration.conftest import LEASE_S, Deployment, admin_headers, wait_until

pytestmark = pytest.mark.integration

DIGITS = load_digits()
FEATURES = (DIGITS.data / 16.0).astype(np.float32)


def samples(start: int, n: int) -> list[dict[str, object]]:
    return [{"features": FEATURES[i].tolist(), "label": int(DIGITS.target[i])}
            for i in range(start, start + n)]


def active_version(dep: Deployment) -> int:
    store = Store(dep.env["SKQK_DATABASE_URL"])
    try:
        version = store.active_version()
        assert version is not None
        return version
    finally:
        store.dispose()


def served_versions(url: str, n: int = 16) -> set[int]:
    """Versions answering /predict on a replica (several requests: it runs several uvicorn workers)."""
    with httpx.Client(base_url=url, timeout=10) as c:
        return {c.post("/predict", json={"inputs": [FEATURES[0].tolist()]}).json()["model_version"]
                for _ in range(n)}


def wait_job(client: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    def finished() -> dict | None:
        job = client.get(f"/retrain/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed") else None

    return wait_until(finished, timeout, 0.05, what=f"job {job_id} to finish")  # type: ignore[return-value]


def submit_retrain(client: httpx.Client, timeout: float = 60, mode: str = "qk") -> str:
    """POST /retrain until it is accepted (a previous job may still be releasing its lock)."""

    def accepted() -> str | None:
        r = client.post("/retrain", json={"mode": mode}, headers=admin_headers())
        return r.json()["job_id"] if r.status_code == 202 else None

    return wait_until(accepted, timeout, 0.2, what="POST /retrain to be accepted")  # type: ignore[return-value]


def test_retrain_through_b_promotes_on_both_replicas_via_pubsub(deployment: Deployment):
    a, b = deployment.replicas
    before = active_version(deployment)
    assert served_versions(a.url) == served_versions(b.url) == {before}
    with a.client() as ca, b.client() as cb:
        r = ca.post("/ingest", json={"samples": samples(0, 200), "idempotency_key": "dist-1"})
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 200
        job_id = cb.post("/retrain", json={"mode": "qk"}, headers=admin_headers()).json()["job_id"]
        job = wait_job(ca, job_id)  # status is shared: asked on the other replica
        seen_done = time.monotonic()
    assert job["status"] == "succeeded", job
    assert job["runner"] == "celery"
    result = job["result"]
    assert result["promoted"], result
    new = result["candidate_version"]
    assert new > before and active_version(deployment) == new

    # The poll runs every 30 s here, so swapping this fast can only come from pub/sub.
    for replica in (a, b):
        wait_until(lambda r=replica: served_versions(r.url) == {new}, 5, 0.05,
                   what=f"{replica.url} to serve version {new}")
    print(f"both replicas served v{new} {time.monotonic() - seen_done:.3f}s after the job read succeeded")


def test_two_concurrent_retrains_run_exactly_one(deployment: Deployment):
    a, b = deployment.replicas
    responses: list[httpx.Response] = []
    barrier = threading.Barrier(2)

    def post(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            barrier.wait()
            responses.append(c.post("/retrain", json={"mode": "qk"}, headers=admin_headers()))

    threads = [threading.Thread(target=post, args=(r.url,)) for r in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in responses)
    assert codes == [202, 409], [r.text for r in responses]
    accepted = next(r for r in responses if r.status_code == 202).json()["job_id"]
    refused = next(r for r in responses if r.status_code == 409).json()
    assert refused["job_id"] == accepted
    with a.client() as ca:
        assert wait_job(ca, accepted)["status"] == "succeeded"


def test_worker_killed_mid_retrain_promotes_nothing_and_recovers(deployment: Deployment):
    a, _b = deployment.replicas
    for worker in deployment.workers:
        worker.stop()
    # A worker whose (full) retrain runs long enough to be killed in the middle.
    slow = deployment.start_worker(SKQK_RETRAIN_EPOCHS="400", SKQK_RETRAIN_PATIENCE="400")
    before = active_version(deployment)
    with a.client() as ca:
        versions_before = {v["version"] for v in ca.get("/models").json()}
        job_id = submit_retrain(ca, mode="full")
        wait_until(lambda: (ca.get(f"/retrain/{job_id}").json()["progress"].get("epoch") or 0) >= 2,
                   120, 0.1, what="the slow retrain to reach epoch 2")
        slow.kill_group()  # SIGKILL the worker and its pool child mid-training
        job = wait_job(ca, job_id, timeout=LEASE_S * 5)
        assert job["status"] == "failed"
        assert "worker lost" in job["error"], job
        models = ca.get("/models").json()
        assert [v["version"] for v in models if v["active"]] == [before]
        assert {v["version"] for v in models} == versions_before  # nothing half-written
        assert served_versions(a.url) == {before}

        deployment.start_worker()
        job2 = wait_job(ca, submit_retrain(ca))
        assert job2["status"] == "succeeded", job2
        assert job2["result"]["promoted"]


def test_redis_outage_keeps_serving_and_ingest_and_recovers(deployment: Deployment):
    a, b = deployment.replicas
    deployment.redis.stop()
    try:
        for i, replica in enumerate((a, b)):
            with replica.client() as c:
                assert c.post("/predict", json={"inputs": [FEATURES[1].tolist()]}).status_code == 200
                r = c.post("/ingest", json={"samples": samples(300 + 10 * i, 10)})
                assert r.status_code == 200, r.text
                r = c.post("/retrain", json={"mode": "qk"}, headers=admin_headers())
                assert r.status_code == 503, r.text
                assert "redis" in r.json()["error"].lower()
    finally:
        deployment.redis.start()
    with b.client() as cb:
        job = wait_job(cb, submit_retrain(cb, timeout=60))
    assert job["status"] == "succeeded", job
    new = job["result"]["candidate_version"] if job["result"]["promoted"] else active_version(deployment)
    for replica in (a, b):  # pub/sub if the subscriber is back already, else the 30 s poll
        wait_until(lambda r=replica: served_versions(r.url) == {new}, 45, 0.2,
                   what=f"{replica.url} to serve version {new}")
