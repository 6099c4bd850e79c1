"""``POST /retrain {"mode": "refresh"}`` over real HTTP (embedded runner): the 202, the job's
phases and result, the holdout gate, the version list, and the hot swap of a promoted candidate."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.helpers.server import API_KEY, ServerProcess, copy_store, fast_env, wait_job

ADMIN = {"X-API-Key": API_KEY}
DIGITS = load_digits()
X = (DIGITS.data / 16.0).astype(np.float32)


@pytest.fixture
def server(template_data_dir: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    data_dir = copy_store(template_data_dir, tmp_path / "data")  # version 1 active, digits rows
    proc = ServerProcess(data_dir, fast_env(data_dir))
    proc.start(ready_timeout=240)
    yield proc
    proc.stop()


def test_refresh_retrain_over_http(server: ServerProcess) -> None:
    bright = np.clip(X[:300] + 0.4, 0.0, 1.0)
    with server.client() as client:
        samples = [{"features": row.tolist(), "label": int(y)} for row, y in zip(bright, DIGITS.target[:300],
                                                                                 strict=True)]
        assert client.post("/ingest", json={"samples": samples}).status_code == 200
        r = client.post("/retrain", json={"mode": "refresh"}, headers=ADMIN)
        assert r.status_code == 202, r.text
        assert r.json()["mode"] == "refresh"
        job = wait_job(client, r.json()["job_id"], timeout=300)
        assert job["status"] == "succeeded", job
        result = job["result"]
        assert result["mode"] == "refresh" and result["mode_reason"] == "requested: mode=refresh"
        drifted = [e["param_layer"] for e in result["drift"]["layers"] if e["rate_ratio"] > 3.0] or [
            max(result["drift"]["layers"], key=lambda e: e["rate_ratio"])["param_layer"]]
        assert result["refresh"]["layers"] == drifted  # default: every drifted layer
        assert result["refresh"]["trained_layers"] == sorted({*drifted, 4})
        assert job["progress"]["phase"] == "done" and "refit_iterations" in job["progress"]
        assert set(result["candidate"]) >= {"holdout_acc"} and set(result["champion"]) >= {"holdout_acc"}
        versions = {v["version"]: v for v in client.get("/models").json()}
        cand = versions[result["candidate_version"]]
        assert cand["mode"] == "refresh" and cand["parent"] == 1
        if result["promoted"]:  # the serving holder swaps to it (poll interval 0.5 s)
            deadline = time.monotonic() + 30
            version = None
            while time.monotonic() < deadline:
                answer = client.post("/predict", json={"inputs": bright[:4].tolist()}).json()
                version = answer["model_version"]
                if version == result["candidate_version"]:
                    break
                time.sleep(0.3)
            assert version == result["candidate_version"]
        else:
            assert "rejected by the gate" in result["reason"]
        bad = client.post("/retrain", json={"mode": "refreshh"}, headers=ADMIN)
        assert bad.status_code == 422 and "mode" in bad.json()["error"]
