"""The embedded runner (thread isolation here; the child-process path runs in tests/api/test_e2e.py)."""

from __future__ import annotations

import threading
import time

import pytest

from app.retrain.embedded_runner import EmbeddedRunner
from app.retrain.protocol import RetrainInProgress, RetrainRunner
from app.retrain.runners import build_runner
from app.settings import Settings
from app.storage import JobRecord, Store


def _wait(runner: RetrainRunner, job_id: str, timeout: float = 120) -> JobRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = runner.status(job_id)
        if job is not None and job.status in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {runner.status(job_id)}")


def test_single_flight_progress_and_hook(sqlite_store: Store, settings: Settings) -> None:
    settings = settings.model_copy(update={"retrain_isolation": "thread"})
    finished: list[JobRecord] = []
    done = threading.Event()

    def hook(job: JobRecord) -> None:
        finished.append(job)
        done.set()

    runner = build_runner(settings, sqlite_store, on_finished=hook)
    assert isinstance(runner, EmbeddedRunner) and isinstance(runner, RetrainRunner)
    try:
        job_id = runner.submit("qk")
        with pytest.raises(RetrainInProgress) as busy:
            runner.submit("full")
        assert busy.value.job_id == job_id
        job = _wait(runner, job_id)
        assert job.status == "succeeded" and job.runner == "embedded:thread"
        assert job.progress["refit_iterations"] >= 1 and job.result["candidate_version"] == 2
        assert done.wait(10) and finished[0].job_id == job_id
        second = runner.submit("qk")  # the lease is free again
        assert _wait(runner, second).status == "succeeded"
        with pytest.raises(ValueError):
            runner.submit("sideways")
        assert runner.status("unknown") is None
    finally:
        runner.close()


def test_orphaned_jobs_are_failed_on_start(sqlite_store: Store, settings: Settings) -> None:
    sqlite_store.create_job("ghost", "qk", runner="embedded:process")
    sqlite_store.update_job("ghost", status="running")
    runner = EmbeddedRunner(sqlite_store, settings)
    try:
        ghost = runner.status("ghost")
        assert ghost.status == "failed" and "went away" in ghost.error
    finally:
        runner.close()
