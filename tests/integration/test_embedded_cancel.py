"""Cancel in embedded mode (no Redis): at once while queued or in a child process; between epochs
in a thread, whichever server process receives the request."""

from __future__ import annotations

import time
from pathlib import Path

from app.retrain.embedded_runner import EmbeddedRunner
from app.storage import Store
from tests.conftest import ServerFactory, fast_settings
from tests.helpers.server import API_KEY, wait_job

ADMIN = {"X-API-Key": API_KEY}


def test_cancel_takes_effect_at_once_and_frees_the_lease(server_factory: ServerFactory):
    server = server_factory()
    with server.client() as c:
        r = c.post("/retrain", json={"mode": "qk", "force": True}, headers=ADMIN)  # nothing new: forced
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        r = c.post(f"/retrain/{job_id}/cancel", headers=ADMIN)
        cancelled_at = time.monotonic()
        # queued (its child process is still starting) or running: stopped either way
        assert r.status_code == 200, r.text
        assert r.json() == {"job_id": job_id, "status": "cancelled"}
        again = c.post("/retrain", json={"mode": "qk", "force": True}, headers=ADMIN)
        print(f"embedded: cancel → next POST /retrain accepted in {time.monotonic() - cancelled_at:.3f}s")
        assert again.status_code == 202, again.text
        assert c.get(f"/retrain/{job_id}").json()["status"] == "cancelled"
        assert c.post(f"/retrain/{job_id}/cancel", headers=ADMIN).status_code == 409
        new = wait_job(c, again.json()["job_id"])
        assert new["status"] == "succeeded", new
        assert c.get(f"/retrain/{job_id}").json()["status"] == "cancelled"
        trained_by = {v["job_id"] for v in c.get("/models").json()}
        assert job_id not in trained_by and new["job_id"] in trained_by


def test_a_cancel_reaches_a_job_run_by_another_server_process(bootstrapped_dir: Path):
    """``skqk serve --workers 2``: the cancel lands on the process that does not run the job."""
    settings = fast_settings(bootstrapped_dir, retrain_isolation="thread", retrain_epochs=5000,
                             retrain_patience=5000)
    store = Store(settings.resolved_database_url)
    runs, other = EmbeddedRunner(store, settings), EmbeddedRunner(store, settings)
    try:
        job_id = runs.submit("full")
        deadline = time.monotonic() + 120
        while (store.get_job(job_id).progress.get("epoch") or 0) < 1:
            assert time.monotonic() < deadline, store.get_job(job_id)
            time.sleep(0.05)
        assert other.cancel(job_id) == "cancelling"
        while not store.get_job(job_id).finished:
            assert time.monotonic() < deadline, store.get_job(job_id)
            time.sleep(0.05)
        job = store.get_job(job_id)
        assert job.status == "cancelled" and job.progress["phase"] == "cancelled", job
        assert job.progress["epoch"] < 5000
        assert other.cancel(job_id) is None
        assert runs.status(runs.submit("qk")) is not None  # the lease is free again
    finally:
        runs.close()
        other.close()
        store.dispose()
