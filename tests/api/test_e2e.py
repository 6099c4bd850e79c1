"""End to end over real HTTP: ingest → retrain (embedded runner, child process) → promoted →
/predict answers with the new version; single-flight 409; progress visible."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from tests.helpers.server import API_KEY

ADMIN = {"X-API-Key": API_KEY}


def _wait_job(c: httpx.Client, job_id: str, timeout: float = 180.0) -> tuple[dict, list[dict]]:
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/retrain/{job_id}").json()
        seen.append(job)
        if job["status"] in ("succeeded", "failed"):
            return job, seen
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {seen[-1]}")


def test_ingest_retrain_promote_predict(server_factory) -> None:
    server = server_factory()
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(1)
    x = np.clip(digits.data / 16.0 + rng.normal(0, 0.05, digits.data.shape), 0, 1).astype(np.float32)
    with server.client() as c:
        for start in range(0, 600, 200):  # new data: noisy copies of digits
            samples = [{"features": x[i].tolist(), "label": int(digits.target[i])}
                       for i in range(start, start + 200)]
            r = c.post("/ingest", json={"samples": samples, "idempotency_key": f"new-{start}"})
            assert r.status_code == 200, r.text
        assert c.post("/predict", json={"inputs": [x[0].tolist()]}).json()["model_version"] == 1

        r = c.post("/retrain", json={"mode": "qk"}, headers=ADMIN)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert r.json()["status"] == "queued"
        busy = c.post("/retrain", json={"mode": "full"}, headers=ADMIN)
        assert busy.status_code == 409 and busy.json()["job_id"] == job_id
        # serving continues while the job runs
        assert c.post("/predict", json={"inputs": [x[1].tolist()]}).status_code == 200

        job, _seen = _wait_job(c, job_id)
        assert job["status"] == "succeeded", job
        assert job["progress"]["refit_iterations"] >= 1  # qk: a feature pass and a refit, no epochs
        result = job["result"]
        assert result["promoted"] is True, result
        new_version = result["candidate_version"]
        assert new_version == 2 and result["n_samples"] == 1797 + 600
        assert result["champion"]["holdout_acc"] > 0.5
        drift = result["drift"]  # the 600 new rows against the 1797 the selector learned on
        assert drift["selector_version"] == 1 and drift["n_new"] == 512
        assert drift["volume_ratio"] == 600 / 1797
        assert drift["nn_ratio"] > 0 and isinstance(drift["recommend_full"], bool)
        gauges = dict(line.rsplit(" ", 1) for line in c.get("/metrics").text.splitlines()
                      if line.startswith("skqk_structural_drift{") or line.startswith("skqk_drift_"))
        assert float(gauges['skqk_structural_drift{signal="nn_ratio"}']) == pytest.approx(drift["nn_ratio"])
        (recommend,) = [v for k, v in gauges.items() if k.startswith("skqk_drift_recommend_full{")]
        assert float(recommend) == float(drift["recommend_full"])

        # the runner refreshes this replica right after promotion
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answer = c.post("/predict", json={"inputs": [x[2].tolist()]}).json()
            if answer["model_version"] == new_version:
                break
            time.sleep(0.1)
        assert answer["model_version"] == new_version
        v2 = c.post("/v2/models/skqk/infer", json={"inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x[2].tolist()}]}).json()
        assert v2["model_version"] == str(new_version)
        models = c.get("/models")
        assert models.headers["x-active-version"] == models.headers["x-serving-version"] == str(new_version)
        listed = next(m for m in models.json() if m["version"] == new_version)
        assert listed["parent"] == 1 and listed["active"] is True

        # a full retrain works through the same path and is registered either way
        r = c.post("/retrain", json={"mode": "full", "force": True}, headers=ADMIN)  # nothing new since v2
        assert r.status_code == 202, r.text
        full, _ = _wait_job(c, r.json()["job_id"])
        assert full["status"] == "succeeded", full
        assert full["result"]["mode"] == "full" and full["result"]["champion_version"] == new_version
        listed = [m["version"] for m in c.get("/models").json()]
        assert full["result"]["candidate_version"] in listed
        metrics = c.get("/metrics").text
        assert 'skqk_retrain_jobs_total{mode="qk",outcome="promoted"} 1.0' in metrics
