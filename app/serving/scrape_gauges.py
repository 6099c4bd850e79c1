"""Gauges that the scraping process sets from the SQL store just before it renders /metrics.

They describe the replica (the store, the job table), not one process: whichever uvicorn
worker answers the scrape reads them fresh and exports them once. Kept in plain Python, never
in the multiprocess files: a file per worker would keep a stale value (or a label set that has
gone, e.g. a ``queued`` job that now runs) from whichever worker was scraped last.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily


class _Child:
    __slots__ = ("_gauge", "_key")

    def __init__(self, gauge: ScrapeGauge, key: tuple[str, ...]) -> None:
        self._gauge, self._key = gauge, key

    def set(self, value: float) -> None:
        self._gauge._values[self._key] = float(value)


class ScrapeGauge:
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {} if self.labelnames else {(): 0.0}
        registry.register(self)

    def labels(self, *values: str) -> _Child:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        return _Child(self, tuple(str(v) for v in values))

    def set(self, value: float) -> None:
        self._values[()] = float(value)

    def get(self, *values: str) -> float | None:
        return self._values.get(tuple(values))

    def replace(self, values: dict[tuple[str, ...], float]) -> None:
        """All label sets at once (a scrape in between sees the old set or the new, not a mix)."""
        self._values = dict(values)

    def clear(self) -> None:
        self._values = {} if self.labelnames else {(): 0.0}

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, value in list(self._values.items()):
            family.add_metric(list(key), value)
        yield family
