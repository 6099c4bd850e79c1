"""mode=auto, "nothing new → nothing done", and the QK solver's real phases, on the job itself."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from app.retrain.job import choose_mode, run_retrain_job
from app.retrain.plan import plan_retrain
from app.settings import Settings
from app.storage import SampleSelection, Store

DIGITS = load_digits()
X = (DIGITS.data / 16.0).astype(np.float32)


def _job(store: Store, mode: str, name: str) -> str:
    store.create_job(name, mode, runner="test")
    return name


def test_plan_counts_only_what_a_retrain_of_the_active_version_would_add(sqlite_store: Store) -> None:
    plan = plan_retrain(sqlite_store)
    assert plan.active_version == 1 and plan.data_watermark == sqlite_store.max_sample_id()
    assert plan.nothing_new and "no new samples" in plan.skip_reason()
    sqlite_store.ingest(np.ones((2, 5), np.float32), [0, 1])  # another schema's rows: not ours
    bad = sqlite_store.ingest(X[:3], DIGITS.target[:3], "bad-batch")
    sqlite_store.quarantine_samples(SampleSelection(batch_id=bad.batch_id), "test", "bad")
    assert plan_retrain(sqlite_store).nothing_new  # quarantined rows are not new data
    sqlite_store.ingest(X[3:10], DIGITS.target[3:10])
    assert plan_retrain(sqlite_store).new_samples == 1  # "any?": one probe
    assert plan_retrain(sqlite_store, cap=100).new_samples == 7


def test_auto_on_a_one_row_trickle_runs_qk_and_says_why(sqlite_store: Store, settings: Settings) -> None:
    sqlite_store.ingest(X[:1], DIGITS.target[:1])
    seen: list[dict] = []
    result = run_retrain_job(sqlite_store, settings, _job(sqlite_store, "auto", "trickle"), "auto",
                             on_progress=seen.append)
    assert result["mode"] == "qk" and result["mode_requested"] == "auto"
    assert "not enough new data to judge" in result["mode_reason"], result["mode_reason"]
    assert result["drift"]["judged"] is False and result["new_samples"] == 1
    assert sqlite_store.get_version(result["candidate_version"], weights=False).mode == "qk"
    job = sqlite_store.get_job("trickle")
    assert job.mode == "auto" and job.progress["mode"] == "qk"
    # the solver's real phases: a feature pass over train + val rows, then the readout refit
    phases = [p["phase"] for p in seen]
    assert phases.index("features") < phases.index("refit") < phases.index("evaluating")
    refit_started = next(p for p in seen if p["phase"] == "refit")  # the pass is over, the solve not
    assert "refit_iterations" not in refit_started
    assert refit_started["rows_done"] == refit_started["rows_total"]
    assert "epoch" not in job.progress and "epochs" not in job.progress
    rows = job.progress["n_train"] + job.progress["n_val"]
    assert job.progress["rows_done"] == job.progress["rows_total"] == rows
    assert 1 <= job.progress["refit_iterations"] <= job.progress["refit_max_iterations"] == 20
    assert job.progress["val_loss"] > 0 and result["epochs_run"] == 0
    assert plan_retrain(sqlite_store).nothing_new == result["promoted"]  # the new watermark covers it


def test_auto_runs_full_when_the_new_data_rivals_the_old(sqlite_store: Store, settings: Settings) -> None:
    sqlite_store.ingest(X[:900], DIGITS.target[:900])  # half as much again: volume_ratio 0.5 > 0.3
    result = run_retrain_job(sqlite_store, settings, _job(sqlite_store, "auto", "big"), "auto")
    assert result["mode"] == "full" and "volume_ratio" in result["mode_reason"], result["mode_reason"]
    assert sqlite_store.get_version(result["candidate_version"], weights=False).mode == "full"
    job = sqlite_store.get_job("big")
    assert job.progress["epochs"] == settings.retrain_epochs and job.progress["epoch"] >= 1


def _signals(**over: object) -> dict:
    return {"rate_ratio": 1.0, "nn_ratio": 1.0, "far_fraction": 0.05, "volume_ratio": 0.1, "judged": True,
            "layers": [{"layer": 1, "param_layer": 0, "rate_ratio": 1.0}], **over}


@pytest.mark.parametrize(("drift", "mode", "says"), [
    (None, "qk", "no drift"),
    (_signals(judged=False, rate_ratio=9.0, reason="not enough new data to judge drift: 3 new samples"), "qk",
     "not enough new data to judge drift: 3 new samples"),
    (_signals(rate_ratio=5.0, reason="rate_ratio 5.00 > 3.0"), "refresh", "rate_ratio 5.00 > 3.0"),
    (_signals(volume_ratio=0.5, reason="volume_ratio 0.50 > 0.3"), "full", "volume_ratio 0.50 > 0.3"),
])
def test_choose_mode(drift: dict | None, mode: str, says: str) -> None:
    chosen, why = choose_mode(drift)
    assert chosen == mode and why.startswith(f"auto: {mode}") and says in why, why
