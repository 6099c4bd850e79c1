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


def test_shared_loop_metrics_sum_over_processes(tmp_path) -> None:
    """Multiprocess mode: each process's lock-free file; a scrape sums them like a Histogram."""
    from app.serving.loop_metrics import SharedLoopGauge
    from app.serving.multiproc_metrics import SlotFile, replica_registry

    theirs = CollectorRegistry()
    ref = Histogram("h_seconds", "doc", ["route"], buckets=BUCKETS, registry=theirs)
    gauges = []
    for pid, values in ((101, VALUES), (102, VALUES[:4])):  # two "processes", each its own files
        loop = LoopHistogram("h_seconds", "doc", ["route"], BUCKETS, registry=CollectorRegistry(),
                             shared=SlotFile(str(tmp_path / f"histogram_loop_{pid}.db")))
        gauge = SharedLoopGauge("g", "doc", SlotFile(str(tmp_path / f"gauge_livesum_loop{pid}.db")))
        for v in values:
            ref.labels("/a").observe(v)
            loop.labels("/a").observe(v)
            gauge.value += 1
        gauge.value -= 1
        gauges.append(gauge)
    ours = replica_registry(str(tmp_path))
    assert {k: v for k, v in _samples(ours).items() if k[0] != "g"} == _samples(theirs)
    assert _samples(ours)[("g", frozenset())] == len(VALUES) - 1 + 4 - 1
    assert sum(loop.labels("/a").counts) == 4 and loop.labels("/a").total == sum(VALUES[:4])


def test_dead_processes_leave_the_live_gauges(tmp_path) -> None:
    import os

    from app.serving.loop_metrics import SharedLoopGauge
    from app.serving.multiproc_metrics import SlotFile, forget_dead_processes, replica_registry

    dead = 2**22 + 12345  # above the usual pid_max: no such process
    for pid in (os.getpid(), dead):
        SharedLoopGauge("g", "doc", SlotFile(str(tmp_path / f"gauge_livesum_loop{pid}.db"))).value = 2
    assert forget_dead_processes(str(tmp_path)) == [dead]
    assert _samples(replica_registry(str(tmp_path)))[("g", frozenset())] == 2
