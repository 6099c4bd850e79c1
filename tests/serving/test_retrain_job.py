"""The retrain job: stable holdout, QK keeps the structure, the promotion gate really gates."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.splits import split_masks
from app.retrain.job import RetrainError, corrupt_estimator, run_retrain_job
from app.settings import Settings
from app.storage import Store


def test_holdout_is_stable_disjoint_and_sized() -> None:
    ids = np.arange(1, 20_001)
    masks = split_masks(ids, 10)
    assert not (masks.train & masks.holdout).any() and not (masks.val & masks.holdout).any()
    assert (masks.train | masks.val | masks.holdout).all()
    assert 0.08 < masks.holdout.mean() < 0.12 and 0.08 < masks.val.mean() < 0.12
    # more data later: the old rows keep their roles
    later = split_masks(np.arange(1, 40_001), 10)
    np.testing.assert_array_equal(later.holdout[:20_000], masks.holdout)


def _job(store: Store, mode: str) -> str:
    job_id = f"job-{mode}-{np.random.default_rng().integers(1 << 30)}"
    store.create_job(job_id, mode, runner="test")
    return job_id


def test_qk_retrain_registers_and_promotes(served_store: Store, settings: Settings) -> None:
    champion = served_store.active_version()
    seen: list[dict] = []
    job_id = _job(served_store, "qk")
    result = run_retrain_job(served_store, settings, job_id, "qk", on_progress=seen.append)
    cand = served_store.get_version(result["candidate_version"], weights=False)
    parent = served_store.get_version(champion, weights=False)
    assert cand.parent == champion and cand.mode == "qk" and cand.job_id == job_id
    assert cand.selector_sha256 == parent.selector_sha256  # structure frozen: identical selector
    assert cand.estimator_sha256 != parent.estimator_sha256
    assert cand.metrics["holdout_acc"] == result["candidate"]["holdout_acc"]
    assert result["promoted"] and served_store.active_version() == cand.version
    assert served_store.promotions()[0].version == cand.version
    job = served_store.get_job(job_id)
    assert job.status == "succeeded" and job.result["candidate_version"] == cand.version
    assert job.progress["phase"] == "done" and job.progress["refit_iterations"] >= 1  # qk: no epochs
    assert any(p.get("phase") == "refit" and "val_acc" in p for p in seen)
    assert result["n_holdout"] >= settings.min_holdout
    assert result["n_train"] + result["n_val"] + result["n_holdout"] == result["n_samples"]


def test_full_retrain_changes_the_selector(sqlite_store: Store, settings: Settings) -> None:
    job_id = _job(sqlite_store, "full")
    result = run_retrain_job(sqlite_store, settings, job_id, "full")
    cand = sqlite_store.get_version(result["candidate_version"], weights=False)
    assert cand.mode == "full"
    assert cand.selector_sha256 == cand.estimator_sha256  # one net is both
    assert cand.selector_sha256 != sqlite_store.get_version(1, weights=False).selector_sha256


@pytest.mark.parametrize("mode", ["qk", "full"])
def test_gate_rejects_a_candidate_made_worse_on_purpose(sqlite_store: Store, settings: Settings,
                                                        mode: str) -> None:
    before = sqlite_store.active_version()
    history = len(sqlite_store.promotions())
    result = run_retrain_job(sqlite_store, settings, _job(sqlite_store, mode), mode,
                             corrupt_candidate=corrupt_estimator())
    assert not result["promoted"]
    assert "rejected by the gate" in result["reason"]
    cand_acc, champ_acc = result["candidate"]["holdout_acc"], result["champion"]["holdout_acc"]
    assert cand_acc < champ_acc - settings.promotion_tolerance
    cand = sqlite_store.get_version(result["candidate_version"], weights=False)
    assert cand is not None and cand.metrics["holdout_acc"] == cand_acc  # registered …
    assert sqlite_store.active_version() == before  # … but not activated
    assert len(sqlite_store.promotions()) == history


def test_gate_rejects_on_postgres_too(served_store: Store, settings: Settings) -> None:
    before = served_store.active_version()
    result = run_retrain_job(served_store, settings, _job(served_store, "qk"), "qk",
                             corrupt_candidate=corrupt_estimator())
    assert not result["promoted"] and served_store.active_version() == before


def test_stale_champion_is_not_overwritten(sqlite_store: Store, settings: Settings) -> None:
    """Someone activates another version while the job trains: the job must not promote."""
    from tests.serving.test_holder import _variant

    other = _variant(sqlite_store, 1.5)
    done = []

    def meddle(progress: dict) -> None:
        if progress.get("phase") == "refit" and not done:
            sqlite_store.activate(other, "ops", "manual roll-forward mid-training")
            done.append(True)

    result = run_retrain_job(sqlite_store, settings, _job(sqlite_store, "qk"), "qk", on_progress=meddle)
    assert done and not result["promoted"]
    assert "stale" in result["reason"]
    assert sqlite_store.active_version() == other


def test_too_little_data_fails_the_job_cleanly(store: Store, settings: Settings) -> None:
    from tests.serving.test_holder import _variant  # noqa: F401 - (keeps import graph simple)

    job_id = _job(store, "qk")
    with pytest.raises(RetrainError):
        run_retrain_job(store, settings, job_id, "qk")  # empty store: no active version
    job = store.get_job(job_id)
    assert job.status == "failed" and "no active model version" in job.error


@pytest.mark.parametrize(("value", "rows"), [(1000.0, 1), (1e20, 1), (3e38, 20)])
def test_outlier_rows_never_crash_or_poison_a_retrain(sqlite_store: Store, settings: Settings, value: float,
                                                      rows: int) -> None:
    """Issue 10, item 1: finite but absurd rows (the data lies in [0, 1]) must not crash the QK
    solver, and a candidate whose holdout metrics are not finite is never promoted."""
    sqlite_store.ingest(np.full((rows, 64), value, dtype=np.float32), np.arange(rows) % 10, "outliers")
    for mode in ("qk", "full"):
        active = sqlite_store.active_version()
        job = f"outlier-{mode}"
        sqlite_store.create_job(job, mode, "test")
        result = run_retrain_job(sqlite_store, settings, job, mode)  # no exception: the job finishes
        cand = result["candidate"]
        finite = all(np.isfinite(v) for v in cand.values() if v is not None) and None not in cand.values()
        if not finite:
            assert result["promoted"] is False and sqlite_store.active_version() == active
        assert sqlite_store.get_job(job).status == "succeeded"
