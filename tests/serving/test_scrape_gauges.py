"""The replica's gauges (read from the store at scrape): drift verdict says its basis, and a
label set that has gone (a queued job now running) leaves the exposition."""

from __future__ import annotations

from app.serving.metrics import ServingMetrics
from app.storage.job_stats import RetrainStats

DRIFT = {"nn_ratio": 1.0, "far_fraction": 0.05, "rate_ratio": 1.0, "volume_ratio": 0.5}


def test_recommend_full_beside_judged_0_says_it_came_from_the_volume() -> None:
    m = ServingMetrics()
    m.set_drift({**DRIFT, "recommend_full": True, "judged": False})  # < 100 new rows, volume 0.5 > 0.3
    text = m.render().decode()
    assert 'skqk_drift_recommend_full{basis="volume"} 1.0' in text  # before: a bare 1 beside judged 0
    assert "skqk_drift_judged 0.0" in text
    m.set_drift({**DRIFT, "volume_ratio": 0.1, "recommend_full": False, "judged": True})
    text = m.render().decode()
    assert 'skqk_drift_recommend_full{basis="signals"} 0.0' in text and "basis=\"volume\"" not in text
    assert "skqk_drift_judged 1.0" in text


def test_retrain_jobs_label_sets_are_replaced_whole() -> None:
    m = ServingMetrics()
    m.set_retrain_stats(RetrainStats(jobs={("auto", "queued"): 1}))
    assert 'skqk_retrain_jobs_total{mode="auto",outcome="queued"} 1.0' in m.render().decode()
    m.set_retrain_stats(RetrainStats(jobs={("qk", "running"): 1}))
    text = m.render().decode()
    assert 'outcome="queued"' not in text
    assert 'skqk_retrain_jobs_total{mode="qk",outcome="running"} 1.0' in text
