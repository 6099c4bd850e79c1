"""Per-request metrics kept without locks, for code that runs on the event loop thread only.

prometheus_client's Histogram takes a lock per bucket and per sum on every ``observe`` and
its Gauge one per ``inc``/``dec``: about 3 µs per request for the request-latency histogram,
the batch-queue histogram and the in-flight gauge together, on a path whose whole Python cost
is a few tens of µs. Observations made on the loop thread alone need no lock, so these keep
plain counters and hand Prometheus a snapshot when /metrics is scraped (also on the loop).
The exposition is the same as a Histogram's (``_bucket{le=…}``, ``_count``, ``_sum``).

Given a ``SlotFile`` (multiprocess mode, app/serving/multiproc_metrics.py) the same counts live
in this process's mmap file instead, still without a lock, and every worker's scrape sums them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from app.serving.multiproc_metrics import (
    SharedGaugeValue,
    SharedHistogramChild,
    SlotFile,
    shared_histogram_child,
)


class LoopHistogramChild:
    __slots__ = ("_bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self._bounds, value)] += 1  # le: a value on a bound counts in it
        self.total += value


class LoopHistogram:
    """A labelled histogram observed from one thread (see the module docstring)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry, shared: SlotFile | None = None) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._bounds = (*sorted(float(b) for b in buckets), float("inf"))
        self._shared = shared
        self._children: dict[tuple[str, ...], LoopHistogramChild | SharedHistogramChild] = {}
        if not self.labelnames:  # exported (as zeros) before the first observation, like a Histogram
            self.labels()
        registry.register(self)

    def labels(self, *values: str) -> LoopHistogramChild | SharedHistogramChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            if self._shared is None:
                child = LoopHistogramChild(self._bounds)
            else:
                child = shared_histogram_child(self._shared, self.name, self.documentation, self.labelnames,
                                               values, self._bounds)
            self._children[values] = child
        return child

    def observe(self, value: float) -> None:  # the unlabelled case
        self.labels().observe(value)

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        if self._shared is not None:  # exported from the files, with the other processes' counts
            return
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(self._bounds, list(child.counts), strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric(list(values), buckets, child.total)
        yield family


class LoopGauge:
    """An integer gauge changed on one thread: ``value`` is a plain attribute, read at scrape."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        from prometheus_client import Gauge

        self.value = 0
        Gauge(name, documentation, registry=registry).set_function(lambda: self.value)


class SharedLoopGauge:
    """``LoopGauge`` in multiprocess mode: ``value`` lives in the process's live-gauge file
    (summed over the live workers when scraped)."""

    __slots__ = ("_value",)

    def __init__(self, name: str, documentation: str, shared: SlotFile) -> None:
        self._value = SharedGaugeValue(shared, name, documentation)

    @property
    def value(self) -> float:
        return self._value.get()

    @value.setter
    def value(self, value: float) -> None:
        self._value.set(value)
