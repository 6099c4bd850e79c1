"""Retrains cron and on-call can trust, over real HTTP (embedded runner, child processes).

One ``skqk serve --workers 2`` started on an empty store for the module: it bootstraps (and
must say so, epoch by epoch), then the tests run in order on what it holds.

- nothing beyond the active version's data watermark → 200 ``skipped``, no job, no version
  (quarantined rows are no new data), unless ``force``;
- a one-row trickle with the default ``mode: auto``: the 202 says ``auto``, the job runs
  ``qk`` "not enough new data to judge", and its progress is the QK solver's real phases;
- ``skqk retrain --url … --wait`` exits 4 / 0 on those outcomes;
- ``/metrics``: the retrain gauges come from the job table, so both uvicorn processes agree.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.helpers.server import API_KEY, REPO, ServerProcess, fast_env, wait_job

ADMIN = {"X-API-Key": API_KEY}
DIGITS = load_digits()
X = (DIGITS.data / 16.0).astype(np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("retrain-ops")  # empty: the server bootstraps version 1
    proc = ServerProcess(data_dir, fast_env(data_dir), extra_args=("--workers", "2"))
    proc.start(ready_timeout=240)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def _count(server: ServerProcess, table: str) -> int:
    with sqlite3.connect(server.data_dir / "skqk.db") as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def _ingest(client: httpx.Client, rows: slice, key: str) -> dict:
    samples = [{"features": X[i].tolist(), "label": int(DIGITS.target[i])}
               for i in range(rows.start, rows.stop)]
    r = client.post("/ingest", json={"samples": samples, "idempotency_key": key})
    assert r.status_code == 200, r.text
    return r.json()


def _skqk(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = fast_env(server.data_dir)  # --url: the CLI opens no store, it asks the server
    return subprocess.run([sys.executable, "-m", "app.cli", "retrain", *args], cwd=REPO, env=env,
                          text=True, capture_output=True, timeout=300, check=False)


def test_serve_logs_bootstrap_progress(server: ServerProcess) -> None:
    log = server.log()
    assert "empty store: bootstrapping version 1 on digits" in log, log
    assert re.search(r"rows stored \(\d+ training, \d+ validation, \d+ holdout\)", log), log
    epochs = re.findall(r"bootstrap epoch (\d+)/6: train_loss=\S+ val_loss=\S+ val_acc=0\.\d{4}", log)
    assert epochs[:2] == ["1", "2"], log
    assert re.search(r"bootstrap done: version 1 active, holdout_acc=0\.\d{4}", log), log


def test_nothing_new_is_skipped_without_a_job_or_a_version(server: ServerProcess,
                                                           client: httpx.Client) -> None:
    jobs, versions = _count(server, "retrain_jobs"), _count(server, "model_versions")
    for body in ({}, {"mode": "qk"}, {"mode": "full", "force": False}):
        r = client.post("/retrain", json=body, headers=ADMIN)
        assert r.status_code == 200, r.text
        skipped = r.json()
        assert skipped["status"] == "skipped" and skipped["new_samples"] == 0
        assert skipped["active_version"] == 1 and "no new samples" in skipped["reason"]
        assert "force" in skipped["reason"]
    assert client.post("/retrain", content=b"", headers=ADMIN).json()["status"] == "skipped"
    # a quarantined row is no new data
    _ingest(client, slice(0, 1), "bad-row")
    r = client.post("/samples/quarantine", json={"ingest_key": "bad-row", "reason": "test"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["affected"] == 1
    assert client.post("/retrain", json={}, headers=ADMIN).json()["status"] == "skipped"
    assert (_count(server, "retrain_jobs"), _count(server, "model_versions")) == (jobs, versions)
    r = client.post("/retrain", json={"force": "yes"}, headers=ADMIN)
    assert r.status_code == 422 and "force" in r.json()["error"]


def test_a_one_row_trickle_with_auto_runs_qk_not_enough_to_judge(client: httpx.Client) -> None:
    _ingest(client, slice(1, 2), "trickle-1")
    r = client.post("/retrain", headers=ADMIN)  # no body: mode auto
    assert r.status_code == 202, r.text
    assert r.json()["mode"] == "auto" and r.json()["status"] == "queued"
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "succeeded", job
    result, progress = job["result"], job["progress"]
    assert job["mode"] == "auto" and result["mode"] == "qk" and result["mode_requested"] == "auto"
    assert "not enough new data to judge" in result["mode_reason"], result["mode_reason"]
    assert result["new_samples"] == 1 and result["drift"]["judged"] is False
    assert result["drift"]["recommend_full"] is False
    # the QK solver's real phases: no epochs, a feature pass, a readout refit
    assert "epoch" not in progress and progress["rows_done"] == progress["rows_total"] > 0
    assert 1 <= progress["refit_iterations"] <= progress["refit_max_iterations"]
    assert job["queued_for_s"] >= 0 and job["workers_online"] is None  # embedded: no queue


def test_cli_url_exit_codes(server: ServerProcess, client: httpx.Client) -> None:
    if client.post("/retrain", json={}, headers=ADMIN).json().get("status") != "skipped":
        pytest.skip("the trickle's candidate was not promoted: its row is still new")
    nothing = _skqk(server, "--url", server.url, "--api-key", API_KEY)
    assert nothing.returncode == 4, nothing.stdout + nothing.stderr
    assert "nothing to do" in nothing.stdout and "no new samples" in nothing.stdout
    _ingest(client, slice(2, 12), "trickle-10")
    ran = _skqk(server, "--url", server.url, "--api-key", API_KEY, "--wait", "--poll", "0.2")
    assert ran.returncode in (0, 3), ran.stdout + ran.stderr
    promoted = ran.returncode == 0
    assert ("promoted" if promoted else "not promoted") in ran.stdout
    assert "mode qk: auto: qk (not enough new data to judge drift: 11 new samples" in ran.stdout, ran.stdout
    assert "readout refit:" in ran.stdout
    denied = _skqk(server, "--url", server.url, "--api-key", "wrong")
    assert denied.returncode == 1 and "401" in denied.stdout


def test_retrain_metrics_come_from_the_job_table(client: httpx.Client) -> None:
    """Both uvicorn processes (--workers 2) answer /metrics; whichever ran a job, they agree."""
    def gauges() -> dict[str, float]:
        text = client.get("/metrics").text
        return {name: float(value) for name, value in re.findall(r"^(skqk_retrain_\S+) (\S+)$", text, re.M)}

    seen = [gauges() for _ in range(12)]
    first = seen[0]
    for other in seen[1:]:  # durations, timestamps and counts are the same on every process
        assert other == first, (other, first)
    done = sum(v for k, v in first.items() if k.startswith("skqk_retrain_jobs_total"))
    assert done >= 1 and first['skqk_retrain_jobs_total{mode="qk",outcome="promoted"}'] >= 1, first
    now = time.time()
    assert now - 600 < first["skqk_retrain_last_success_timestamp_seconds"] <= now + 5
    assert first["skqk_retrain_last_failure_timestamp_seconds"] == 0
    assert first["skqk_retrain_last_duration_seconds"] > 0
    assert first["skqk_retrain_last_queue_wait_seconds"] >= 0
    assert "skqk_retrain_new_samples" in first


def test_openapi_documents_the_skip(client: httpx.Client) -> None:
    op = client.get("/openapi.json").json()["paths"]["/retrain"]["post"]
    assert set(op["responses"]) >= {"200", "202", "409", "503"}
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RetrainSkipped"}
