"""`/ingest` latency of a one-row request against a SQLite store of 10 k vs 1 M rows.

What it shows: the cost of ``total_samples`` in every ``/ingest`` answer as the table grows
(a ``count(*)`` per request scans an index of the whole table; a maintained counter does not).

Usage: ``python bench/ingest_total.py [--sizes 10000,1000000] [--requests 300]``

Per size: a store is bootstrapped on digits (1 epoch: the model does not matter here), filled
with uniform rows up to the size (``Store.ingest`` in chunks of 100,000), checkpointed, then a
real ``skqk serve`` answers ``--requests`` sequential one-row ``/ingest`` calls from one client
(after 20 warm-up calls); p50/p95/mean in ms are printed. Nothing is written to the docs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers.server import ServerProcess, fast_env


def build_store(data_dir: Path, rows: int) -> None:
    from app.intake.bootstrap import bootstrap_version
    from app.settings import Settings
    from app.storage import open_store

    settings = Settings(data_dir=data_dir, bootstrap_epochs=1, bootstrap_arch="mlp:64-64", device="cpu")
    store = open_store(settings.resolved_database_url)
    bootstrap_version(store, settings)
    gen = np.random.default_rng(0)
    left = rows - store.sample_count()
    while left > 0:
        n = min(100_000, left)
        store.ingest(gen.random((n, 64), dtype=np.float32), gen.integers(0, 10, n))
        left -= n
    with store.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    store.dispose()


def ingest_latencies_ms(c: httpx.Client, requests: int, row: Callable[[], list[float]],
                        warmup: int = 20) -> list[float]:
    """Milliseconds per one-row ``POST /ingest``, after ``warmup`` requests that are not counted."""
    times = []
    for i in range(requests + warmup):
        body = {"samples": [{"features": row(), "label": int(i % 10)}]}
        t0 = time.perf_counter()
        r = c.post("/ingest", json=body)
        elapsed = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        if i >= warmup:
            times.append(elapsed * 1000)
    return times


def measure(data_dir: Path, requests: int) -> list[float]:
    env = fast_env(data_dir, SKQK_INPUT_RANGE="off")
    gen = np.random.default_rng(1)
    with ServerProcess(data_dir, env) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        return ingest_latencies_ms(c, requests, lambda: gen.random(64).round(4).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = Path(tmp)
            t0 = time.perf_counter()
            build_store(data_dir, size)
            built = time.perf_counter() - t0
            times = sorted(measure(data_dir, args.requests))
            p50, p95 = (times[min(len(times) - 1, int(q * len(times)))] for q in (0.5, 0.95))
            print(f"{size:>9,} rows (built in {built:.0f}s): /ingest 1 row p50 {p50:.2f} ms, "
                  f"p95 {p95:.2f} ms, mean {statistics.mean(times):.2f} ms over {len(times)}")


if __name__ == "__main__":
    main()
