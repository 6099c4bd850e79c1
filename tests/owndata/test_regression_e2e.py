"""A regression model end to end over real HTTP: init from a CSV (two targets) → ingest named
rows → QK retrain (ridge readout) → promoted on holdout RMSE → predictions change."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.helpers.server import API_KEY, ServerProcess, fast_env, wait_job
from tests.owndata.conftest import INIT_FAST, regression_table, skqk, write_csv

ADMIN = {"X-API-Key": API_KEY}


def test_regression_init_ingest_retrain_promote(data_dir: Path, tmp_path: Path) -> None:
    path = write_csv(regression_table(1500, seed=0), tmp_path / "plant.csv")
    run = skqk(data_dir, "init", "--data", str(path), "--label-column", "load,temp", "--task", "regression",
               *INIT_FAST)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "holdout_rmse=" in run.stdout
    # the summary is valid JSON: no accuracy for regression is null, not NaN (json.loads takes
    # NaN, so parse strictly)
    summary = run.stdout[run.stdout.index("{"):]
    metrics = json.loads(summary, parse_constant=lambda c: pytest.fail(f"not JSON: {c} in {summary}"))
    assert metrics["holdout_rmse"] > 0 and metrics.get("best_val_acc", None) is None

    new = regression_table(800, seed=1, shift=1.5)  # the plant drifted: both targets 1.5 higher
    features = [f"sensor_{i}" for i in range(6)]
    rows = new.to_pylist()
    probe = {k: rows[0][k] for k in features}
    with ServerProcess(data_dir, fast_env(data_dir, SKQK_INPUT_RANGE="off")) as server, server.client() as c:
        before = c.post("/predict", json={"inputs": [probe]})
        assert before.status_code == 200, before.text
        body = before.json()
        assert body["model_version"] == 1 and len(body["predictions"][0]) == 2  # two targets

        samples = [{"features": {k: r[k] for k in features}, "label": [r["load"], r["temp"]]} for r in rows]
        r = c.post("/ingest", json={"samples": samples, "idempotency_key": "plant-day-2"})
        assert r.status_code == 200, r.text
        assert c.get("/samples/count").json() == {"total": 2300}

        r = c.post("/retrain", json={"mode": "qk"}, headers=ADMIN)
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["job_id"])
        assert job["status"] == "succeeded", job
        result = job["result"]
        assert result["task"] == "regression"
        cand, champ = result["candidate"], result["champion"]
        assert {"holdout_rmse", "holdout_mae", "holdout_r2"} <= set(cand)
        assert "holdout_acc" not in cand
        assert cand["holdout_rmse"] < champ["holdout_rmse"]  # the refit learnt the shift
        assert result["promoted"] is True, result

        deadline = time.monotonic() + 10
        while (after := c.post("/predict", json={"inputs": [probe]}).json())["model_version"] != 2:
            assert time.monotonic() < deadline, "the server did not swap to version 2"
            time.sleep(0.1)
        assert after["predictions"] != body["predictions"]
        models = c.get("/models").json()
        assert models[-1]["metrics"]["holdout_rmse"] == cand["holdout_rmse"]
        assert models[-1]["schema"]["task"] == "regression"
        assert models[-1]["schema"]["target_names"] == ["load", "temp"]
        metrics = c.get("/metrics").text
        assert 'skqk_model_holdout{metric="rmse"}' in metrics and 'metric="r2"' in metrics
        assert 'metric="acc"' not in metrics
