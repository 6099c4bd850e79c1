"""Distributed path end to end: real Redis, Postgres, Celery worker and two API replicas."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import redis
from sklearn.datasets import load_digits

from app.distributed import GPU_QUEUE, LOCK_NAME
from app.storage import Store
from tests.integration.conftest import LEASE_S, REPUBLISH_S, Deployment, Process, admin_headers, wait_until

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
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(finished, timeout, 0.05, what=f"job {job_id} to finish")  # type: ignore[return-value]


def submit_retrain(client: httpx.Client, timeout: float = 60, mode: str = "qk") -> str:
    """POST /retrain until it is accepted (a previous job may still be releasing its lock)."""

    def accepted() -> str | None:
        r = client.post("/retrain", json={"mode": mode, "force": True}, headers=admin_headers())
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
            responses.append(c.post("/retrain", json={"mode": "qk", "force": True}, headers=admin_headers()))

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


# ---- jobs are never lost, cancels work at once, GETs change nothing --------------------------

def job_of(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/retrain/{job_id}").json()


def log_since(worker: Process, marker: str) -> str:
    """The worker's log from the first line containing ``marker`` on."""
    text = worker.log_path.read_text(errors="replace")
    return text[text.index(marker):] if marker in text else ""


def kill_workers(deployment: Deployment) -> None:
    """Workers die without a goodbye: their heartbeat outlives them (SKQK_RETRAIN_WORKER_TTL_S),
    so POST /retrain still queues, and nobody picks the job up."""
    for worker in deployment.workers:
        worker.kill_group()


def test_cancel_of_a_queued_job_is_immediate_and_frees_the_lock(deployment: Deployment):
    a, b = deployment.replicas
    kill_workers(deployment)  # nobody picks the job up: it stays queued
    with a.client() as ca, b.client() as cb:
        job_id = submit_retrain(ca)
        assert job_of(cb, job_id)["status"] == "queued"
        r = cb.post(f"/retrain/{job_id}/cancel", headers=admin_headers())
        cancelled_at = time.monotonic()
        assert r.status_code == 200, r.text
        assert r.json() == {"job_id": job_id, "status": "cancelled"}
        again = ca.post("/retrain", json={"mode": "qk", "force": True}, headers=admin_headers())
        print(f"cancel of a queued job → next POST /retrain accepted: "
              f"{time.monotonic() - cancelled_at:.3f}s")
        assert again.status_code == 202, again.text  # the lock is free at once
        assert job_of(ca, job_id)["status"] == "cancelled"
        r = cb.post(f"/retrain/{job_id}/cancel", headers=admin_headers())
        assert r.status_code == 409 and "cancelled" in r.json()["error"]

        worker = deployment.start_worker()  # gets both messages: the cancelled one does nothing
        new = wait_job(ca, again.json()["job_id"])
        assert new["status"] == "succeeded", new
        wait_until(lambda: f"retrain job {job_id} is already cancelled" in worker.log(), 30,
                   what=f"the cancelled job's delivery to do nothing:\n{worker.log()}")
        assert job_of(ca, job_id)["status"] == "cancelled"
        assert "Traceback" not in worker.log()


def test_a_message_lost_by_a_dying_worker_is_published_again(deployment: Deployment):
    a, _b = deployment.replicas
    kill_workers(deployment)
    broker = redis.Redis(port=deployment.redis.port, decode_responses=True)
    with a.client() as ca:
        job_id = submit_retrain(ca)
        # A worker's BRPOP took the message and the worker died before acking it: gone.
        mine = [m for m in broker.lrange(GPU_QUEUE, 0, -1) if job_id in m]
        assert len(mine) == 1 and broker.lrem(GPU_QUEUE, 0, mine[0]) == 1
        lost_at = time.monotonic()
        deployment.start_worker()
        wait_until(lambda: job_of(ca, job_id)["status"] != "queued", 60, 0.05,
                   what=f"job {job_id} to start again")
        print(f"lost message → job running again: {time.monotonic() - lost_at:.3f}s "
              f"(republish interval {REPUBLISH_S} s, worker start included)")
        job = wait_job(ca, job_id)
        assert job["status"] == "succeeded", job
        assert job["progress"]["delivery"]["republished"] >= 1, job["progress"]
        after = ca.post("/retrain", json={"mode": "qk", "force": True}, headers=admin_headers())
        assert after.status_code == 202, after.text  # nothing left holding the lock
        assert wait_job(ca, after.json()["job_id"])["status"] == "succeeded"
    broker.close()


def test_redis_restart_mid_training_neither_fails_the_job_nor_starts_another(deployment: Deployment):
    a, b = deployment.replicas
    deployment.running_worker()
    broker = redis.Redis(port=deployment.redis.port, decode_responses=True)
    deployment.pause_file.touch()  # the job holds after each epoch while this file exists
    try:
        with a.client() as ca, b.client() as cb:
            job_id = submit_retrain(ca, mode="full")
            wait_until(lambda: (job_of(ca, job_id)["progress"].get("epoch") or 0) >= 1, 60, 0.1,
                       what="the retrain to reach epoch 1")
            deployment.redis.stop()
            deployment.redis.start()  # no persistence: the lock and every key are gone
            for client in (ca, cb, ca, cb):  # unauthenticated reads change nothing
                assert job_of(client, job_id)["status"] == "running"

            def second_post(client: httpx.Client) -> httpx.Response | None:
                r = client.post("/retrain", json={"mode": "qk", "force": True}, headers=admin_headers())
                return r if r.status_code != 503 else None  # 503 until the replica reconnects

            for client in (ca, cb):
                r = wait_until(lambda c=client: second_post(c), 30, 0.2, what="a POST /retrain answer")
                assert r.status_code == 409, r.text
                assert r.json()["job_id"] == job_id
            # the worker's heartbeat takes the lock back for its job
            wait_until(lambda: broker.get(LOCK_NAME) == job_id, 30, 0.1,
                       what="the worker to take the retrain lock again")
            assert job_of(cb, job_id)["status"] == "running"
    finally:
        deployment.pause_file.unlink(missing_ok=True)
    with a.client() as ca:
        job = wait_job(ca, job_id)
        assert job["status"] == "succeeded", job
        assert "lost the retrain lock" not in job["result"]["reason"], job["result"]
        store = Store(deployment.env["SKQK_DATABASE_URL"])
        try:  # exactly one job trained: none was created since
            since = store.get_job(job_id).created_at
            later = [j.job_id for j in store.list_jobs(limit=20) if j.created_at > since]
        finally:
            store.dispose()
        assert later == []
        assert wait_job(ca, submit_retrain(ca))["status"] == "succeeded"
    broker.close()


def test_cancel_of_a_running_job_ends_cancelled_without_a_traceback(deployment: Deployment):
    a, _b = deployment.replicas
    worker = deployment.running_worker()
    deployment.pause_file.touch()
    try:
        with a.client() as ca:
            job_id = submit_retrain(ca, mode="full")
            wait_until(lambda: (job_of(ca, job_id)["progress"].get("epoch") or 0) >= 1, 60, 0.1,
                       what="the retrain to reach epoch 1")
            r = ca.post(f"/retrain/{job_id}/cancel", headers=admin_headers())
            assert r.status_code == 202, r.text
            assert r.json() == {"job_id": job_id, "status": "cancelling"}
            job = wait_job(ca, job_id)
    finally:
        deployment.pause_file.unlink(missing_ok=True)
    assert job["status"] == "cancelled", job
    assert job["progress"]["phase"] == "cancelled"
    log = log_since(worker, f"Task workers.tasks.retrain[{job_id}] received")
    assert f"retrain job {job_id} cancelled by request" in log, log
    assert "Traceback" not in log and "ERROR" not in log, log
