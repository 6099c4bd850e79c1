"""One /metrics scrape for all uvicorn workers of a replica (``skqk serve --workers N``).

prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before the workers
start) keeps every Counter/Gauge/Histogram value in a per-process mmap file and sums the files
when any worker is scraped. Its values take a lock on every change, though, and the request
metrics of the hot path are lock-free on purpose (app/serving/loop_metrics.py). So those keep
their own per-process file here, in the same format (``MmapedDict``: key, value, timestamp),
and are changed without a lock: one process, one thread (the event loop) writes each file,
and an aligned 8-byte store is atomic on the CPUs we run on, so a reader in another process
sees the old or the new double, never a torn one. ``MultiProcessCollector`` reads these files
with the others: ``histogram_loop_<pid>.db`` sums like any histogram,
``gauge_livesum_loop<pid>.db`` (in-flight requests) like a ``livesum`` gauge.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, values
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

ENV = "PROMETHEUS_MULTIPROC_DIR"
_CAPACITY = 1 << 20  # ~5000 series before the file grows (it can: old views stay valid)


def multiproc_dir() -> str | None:
    """The shared directory when this process runs in multiprocess mode, else None.

    prometheus_client picks its value class when first imported: the variable must have been
    set before that (``skqk serve`` sets it before uvicorn spawns the workers).
    """
    path = os.environ.get(ENV)
    if path and os.path.isdir(path) and values.ValueClass is not values.MutexValue:
        return path
    return None


class SlotFile:
    """This process's file of lock-free values: ``slot(key)`` → an index into ``view(key)``."""

    def __init__(self, path: str) -> None:
        with open(path, "ab") as f:  # preallocated: growing remaps, which we'd rather not do often
            if os.fstat(f.fileno()).st_size < _CAPACITY:
                f.truncate(_CAPACITY)
        self._dict = MmapedDict(path)
        self._views: dict[int, memoryview] = {}  # id(mmap) → a view of doubles over it

    def slots(self, keys: Sequence[str]) -> tuple[memoryview, list[int]]:
        """One view and the indices of the ``keys``' values in it (created as 0.0 on first use)."""
        for key in keys:
            self._dict.read_value(key)  # appends the entry when new (the file may grow: a new map)
        m = self._dict._m  # the current map covers every entry; an older one stays valid for its own
        view = self._views.get(id(m))
        if view is None:
            view = self._views[id(m)] = memoryview(m).cast("d")
        return view, [self._dict._positions[key] // 8 for key in keys]  # positions are 8-byte aligned


class SharedHistogramChild:
    """``LoopHistogramChild``'s twin whose counts live in the process's slot file."""

    __slots__ = ("_bounds", "_buckets", "_sum", "_view")

    def __init__(self, bounds: tuple[float, ...], view: memoryview, buckets: list[int],
                 sum_slot: int) -> None:
        self._bounds, self._view, self._buckets, self._sum = bounds, view, buckets, sum_slot

    def observe(self, value: float) -> None:
        view = self._view
        view[self._buckets[bisect_left(self._bounds, value)]] += 1.0
        view[self._sum] += value

    @property
    def counts(self) -> list[int]:
        return [int(self._view[i]) for i in self._buckets]

    @property
    def total(self) -> float:
        return float(self._view[self._sum])


def shared_histogram_child(file: SlotFile, name: str, documentation: str, labelnames: Sequence[str],
                           labelvalues: Sequence[str], bounds: tuple[float, ...]) -> SharedHistogramChild:
    keys = [mmap_key(name, f"{name}_bucket", [*labelnames, "le"], [*labelvalues, floatToGoString(b)],
                     documentation) for b in bounds]
    keys.append(mmap_key(name, f"{name}_sum", list(labelnames), list(labelvalues), documentation))
    view, slots = file.slots(keys)
    return SharedHistogramChild(bounds, view, slots[:-1], slots[-1])


class SharedGaugeValue:
    """A float slot read and written like a plain attribute (``LoopGauge.value``)."""

    __slots__ = ("_slot", "_view")

    def __init__(self, file: SlotFile, name: str, documentation: str) -> None:
        self._view, (self._slot,) = file.slots([mmap_key(name, name, [], [], documentation)])

    def get(self) -> float:
        return self._view[self._slot]

    def set(self, value: float) -> None:
        self._view[self._slot] = value


class ProcessFiles:
    """The slot files of this process in the shared directory."""

    def __init__(self, path: str) -> None:
        pid = os.getpid()
        self.histograms = SlotFile(os.path.join(path, f"histogram_loop_{pid}.db"))
        self.live_gauges = SlotFile(os.path.join(path, f"gauge_livesum_loop{pid}.db"))


_LIVE = re.compile(r"^gauge_live[a-z]+_\D*(\d+)\.db$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forget_dead_processes(path: str) -> list[int]:
    """Remove the ``live*`` gauge files of processes that are gone (a worker uvicorn restarted):
    their in-flight requests and queue depth are not the replica's any more. Counters and
    histograms of dead processes stay: a counter must not go down."""
    dead = set()
    for f in glob.glob(os.path.join(path, "gauge_live*.db")):
        m = _LIVE.match(os.path.basename(f))
        if m and not _alive(int(m.group(1))):
            dead.add(int(m.group(1)))
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)
    return sorted(dead)


def replica_registry(path: str) -> CollectorRegistry:
    """A registry that reads every process's files when collected."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path)
    return registry


def reset_dir(path: str) -> None:
    """Empty the directory before the workers start: files of an earlier run would add up."""
    os.makedirs(path, exist_ok=True)
    for f in glob.glob(os.path.join(path, "*.db")):
        os.remove(f)



def prepare_workers(workers: int) -> str | None:
    """Before uvicorn starts ``workers`` processes: multiprocess mode when there are several.

    Uses ``PROMETHEUS_MULTIPROC_DIR`` when set (emptied: files of an earlier run would add up),
    else a fresh temporary directory. Returns the directory to remove after the run, if ours.
    """
    path = os.environ.get(ENV)
    if path:  # the operator's (even with one worker): files of an earlier run would add up
        reset_dir(path)
        return None
    if workers <= 1:
        return None
    import tempfile

    path = os.environ[ENV] = tempfile.mkdtemp(prefix="skqk-metrics-")
    return path
