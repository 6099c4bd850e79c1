"""mode=refresh on the retrain job: auto picks it on shifted inputs, only the drifted layer moves,
its phases, cancel, and the next retrain's drift is measured against the refreshed selector."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from app.core.refresh import changed_layers
from app.core.training import TrainingCancelled
from app.retrain.job import run_retrain_job
from app.serving.models import load_model
from app.settings import Settings
from app.storage import Store

DIGITS = load_digits()
X = (DIGITS.data / 16.0).astype(np.float32)


def _job(store: Store, mode: str, name: str) -> str:
    store.create_job(name, mode, runner="test")
    return name


def _ingest_bright(store: Store, rows: slice, shift: float = 0.4) -> None:
    store.ingest(np.clip(X[rows] + shift, 0.0, 1.0), DIGITS.target[rows])


def test_auto_refreshes_shifted_inputs_and_only_the_first_layer_moves(sqlite_store: Store,
                                                                       settings: Settings) -> None:
    _ingest_bright(sqlite_store, slice(0, 300))  # 300 of ~1800: volume 0.17, brightness shift
    settings = settings.model_copy(update={"retrain_refresh_max_layers": 1})  # the lowest drifted only
    seen: list[dict] = []
    result = run_retrain_job(sqlite_store, settings, _job(sqlite_store, "auto", "bright"), "auto",
                             on_progress=seen.append)
    assert result["mode"] == "refresh" and result["mode_requested"] == "auto", result["mode_reason"]
    assert "inputs shifted" in result["mode_reason"] and "layer 0" in result["mode_reason"]
    assert result["drift"]["layers"][0]["rate_ratio"] > 3.0
    assert result["refresh"]["layers"] == [0] and result["refresh"]["trained_layers"] == [0, 4]
    assert result["refresh"]["rows_new"] > 0 and result["solver"] == "refresh"
    champion, _ = load_model(sqlite_store, 1)
    candidate, record = load_model(sqlite_store, result["candidate_version"])
    assert record.mode == "refresh"
    assert changed_layers(champion.selector.net, candidate.selector.net) == [0, 4]  # layer 2 bit-identical
    assert candidate.shares_hidden_layers()  # QK after refresh: the new selector, frozen
    phases = [p["phase"] for p in seen]
    assert phases.index("refresh") < phases.index("refit") < phases.index("evaluating")
    epochs = [p["epoch"] for p in seen if p["phase"] == "refresh" and "epoch" in p]
    assert epochs and max(epochs) <= settings.retrain_refresh_epochs
    assert result["candidate"]["holdout_acc"] > 0.5
    if result["promoted"]:  # the next drift is measured against the refreshed selector
        _ingest_bright(sqlite_store, slice(300, 320))
        again = run_retrain_job(sqlite_store, settings, _job(sqlite_store, "qk", "after"), "qk")
        assert again["drift"]["selector_version"] == result["candidate_version"]


def test_refresh_without_new_rows_since_the_selector_fails_clearly(sqlite_store: Store,
                                                                   settings: Settings) -> None:
    with pytest.raises(ValueError, match="mode=refresh needs the drift"):
        run_retrain_job(sqlite_store, settings, _job(sqlite_store, "refresh", "empty"), "refresh")
    job = sqlite_store.get_job("empty")
    assert job.status == "failed" and "mode=refresh needs the drift" in job.error
    assert sqlite_store.active_version() == 1


def test_refresh_cancels_between_epochs(sqlite_store: Store, settings: Settings) -> None:
    _ingest_bright(sqlite_store, slice(0, 200))
    seen: list[dict] = []

    def cancel() -> bool:  # once the first refresh epoch is reported
        return any(p["phase"] == "refresh" and p.get("epoch") == 1 for p in seen)

    before = len(sqlite_store.list_versions())
    with pytest.raises(TrainingCancelled):
        run_retrain_job(sqlite_store, settings, _job(sqlite_store, "refresh", "stop"), "refresh",
                        should_cancel=cancel, on_progress=seen.append)
    job = sqlite_store.get_job("stop")
    assert job.status == "cancelled" and job.progress["phase"] == "cancelled"
    assert sqlite_store.active_version() == 1
    assert len(sqlite_store.list_versions()) == before  # nothing registered
