"""The lock-free request metrics export exactly what prometheus_client's own types would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from app.serving.loop_metrics import LoopGauge, LoopHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)
VALUES = (0.0, 0.001, 0.0011, 0.05, 0.1, 0.5, 1.0, 3.0, 0.01)  # on, under and over bounds


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if not s.name.endswith("_created"):  # a timestamp: differs by construction
                out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_loop_histogram_matches_a_prometheus_histogram() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    ref = Histogram("h_seconds", "doc", ["route"], buckets=BUCKETS, registry=theirs)
    loop = LoopHistogram("h_seconds", "doc", ["route"], BUCKETS, registry=ours)
    for route in ("/a", "/b"):
        for v in VALUES if route == "/a" else VALUES[:3]:
            ref.labels(route).observe(v)
            loop.labels(route).observe(v)
    assert _samples(ours) == _samples(theirs)
    assert b'h_seconds_bucket{le="+Inf",route="/a"} 9.0' in generate_latest(ours)


def test_unlabelled_loop_histogram_is_exported_before_any_observation() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    Histogram("q_seconds", "doc", buckets=BUCKETS, registry=theirs)
    LoopHistogram("q_seconds", "doc", (), BUCKETS, registry=ours)
    assert _samples(ours) == _samples(theirs)


def test_loop_gauge_is_read_when_scraped() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    Gauge("g", "doc", registry=theirs).set(3)
    gauge = LoopGauge("g", "doc", registry=ours)
    gauge.value += 5
    gauge.value -= 2
    assert _samples(ours) == _samples(theirs)
