"""Deleting or quarantining rows while a full retrain runs (issue 20, item 2), on a real
``skqk serve``: the gate must score candidate and champion on the holdout the job fixed at
its start, ``n_holdout`` must be the rows it scored, and a candidate is never promoted on a
holdout that was emptied under it (before the fix: both scored 0.0 on no rows, promoted)."""

from __future__ import annotations

import time

import pytest

from tests.helpers.server import API_KEY, wait_job

ADMIN = {"X-API-Key": API_KEY}


@pytest.mark.parametrize("action", ["delete", "quarantine"])
def test_rows_removed_during_a_full_retrain_do_not_empty_its_holdout(server_factory, action: str) -> None:
    server = server_factory(retrain_epochs="150", retrain_patience="150")
    with server.client() as c:
        r = c.post("/retrain", json={"mode": "full", "force": True}, headers=ADMIN)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 120
        while True:  # wait for epoch 1 of the training phase
            job = c.get(f"/retrain/{job_id}", headers=ADMIN).json()
            progress = job.get("progress") or {}
            assert job["status"] in ("queued", "running"), job
            if progress.get("phase") == "training" and (progress.get("epoch") or 0) >= 1:
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        fixed = progress["n_holdout"]
        assert fixed > 100
        r = c.post(f"/samples/{action}", headers=ADMIN,
                   json={"from_id": 1, "reason": "test: during a retrain"})
        assert r.status_code == 200, r.text
        assert c.get("/samples/count").json()["total"] == 0  # retrains see no rows at all now
        during = c.get(f"/retrain/{job_id}").json()
        assert during["status"] == "running" and during["progress"]["phase"] == "training", during
        job = wait_job(c, job_id, timeout=300)
        assert job["status"] in ("succeeded", "failed"), job
        if job["status"] == "failed":  # allowed only with a clear reason, nothing promoted
            assert "holdout" in job["error"], job
            assert c.get("/models").headers["X-Active-Version"] == "1"
            return
        result = job["result"]
        assert result["n_holdout"] == fixed  # scored on the rows fixed at the start
        assert result["champion"]["holdout_acc"] > 0.5, result  # really evaluated (was 0.0 on no rows)
        assert result["candidate"]["holdout_loss"] > 0.0, result
