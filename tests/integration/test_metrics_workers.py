"""One /metrics scrape of ``skqk serve --workers 2`` covers both uvicorn processes.

Before: each worker exported its own counters and consecutive scrapes read one worker's, then
the other's (0, 200, 0, 200: counter resets for Prometheus). Now: under load the counters
never go down from one scrape to the next, and once the load has been answered 20
consecutive scrapes all equal the requests sent, whichever worker answers.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from sklearn.datasets import load_digits

from tests.helpers.server import ServerProcess, fast_env

DIGITS = load_digits()
X = (DIGITS.data / 16.0).astype(np.float32)
PREDICT = 'skqk_request_latency_seconds_count{method="POST",route="/predict",status="200"}'
INGESTED = "skqk_http_ingest_samples_total"
ACCEPTED = 'skqk_ingest_requests_total{outcome="accepted"}'


def _scrape(client: httpx.Client) -> dict[str, float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    return {k: float(v) for k, v in re.findall(r"^(skqk_\S+) (\S+)$", r.text, re.M)}


def _post_when_loaded(client: httpx.Client, path: str, body: dict) -> httpx.Response:
    """POST, retrying (as a client honouring Retry-After would) while this connection's worker is
    still loading its model: the server is ready once one worker is, the other may follow later."""
    deadline = time.monotonic() + 120
    while True:
        r = client.post(path, json=body)
        if r.status_code != 503 or "no model loaded yet" not in r.text or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_counters_add_up_over_workers(bootstrapped_dir: Path, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "prom"  # the operator's own directory (else the CLI makes a temp one)
    env = fast_env(bootstrapped_dir, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    (metrics_dir).mkdir()
    (metrics_dir / "counter_99999999.db").write_bytes(b"stale")  # an earlier run's: emptied at start
    server = ServerProcess(bootstrapped_dir, env, extra_args=("--workers", "2"))
    server.start(ready_timeout=180)
    try:
        threads, per_thread, rows_per_ingest = 4, 40, 3
        sent = {"predict": 0, "ingest": 0}
        lock = threading.Lock()

        def load(t: int) -> None:
            with server.client() as c:  # one connection per thread: the kernel spreads them over workers
                for i in range(per_thread):
                    r = _post_when_loaded(c, "/predict", {"inputs": X[i: i + 2].tolist()})
                    assert r.status_code == 200, r.text
                    with lock:
                        sent["predict"] += 1
                    if i % 10 == 0:
                        first = (t * per_thread + i) % 1500
                        samples = [{"features": X[j].tolist(), "label": int(DIGITS.target[j])}
                                   for j in range(first, first + rows_per_ingest)]
                        r = _post_when_loaded(c, "/ingest", {"samples": samples})
                        assert r.status_code == 200, r.text
                        with lock:
                            sent["ingest"] += 1

        workers = [threading.Thread(target=load, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        with server.client() as c:
            during = []
            while any(w.is_alive() for w in workers):  # scraped under load: never a step back
                seen = _scrape(c)
                with lock:
                    upper = dict(sent)  # read after the scrape: what it counted has been answered …
                during.append(seen)
                # … or is in flight (counted before its answer reaches the client): one per thread
                assert seen.get(PREDICT, 0) <= upper["predict"] + threads
            for w in workers:
                w.join()
            for before, later in itertools.pairwise(during):
                for name in (PREDICT, INGESTED, ACCEPTED):
                    assert later.get(name, 0) >= before.get(name, 0), (name, before, later)

            # a request's latency is observed once its answer has been sent, so the last ones may
            # land a moment after the client has them: wait (bounded) for the count to settle
            deadline = time.monotonic() + 10
            while _scrape(c).get(PREDICT, 0) < sent["predict"] and time.monotonic() < deadline:
                time.sleep(0.05)
            after = [_scrape(c) for _ in range(20)]  # any worker may answer each
        assert sent["predict"] == threads * per_thread
        for seen in after:
            assert seen[PREDICT] == sent["predict"], (seen[PREDICT], sent)
            assert seen[ACCEPTED] == sent["ingest"]
            assert seen[INGESTED] == sent["ingest"] * rows_per_ingest
            assert seen["skqk_requests_in_flight"] == 1  # the scrape itself, whichever worker
        # both processes served and wrote their own files (the stale one was removed at start)
        files = glob.glob(str(metrics_dir / "histogram_loop_*.db"))
        pids = {re.search(r"(\d+)\.db$", f).group(1) for f in files}
        assert len(pids) == 2, pids
        assert not os.path.exists(metrics_dir / "counter_99999999.db")
    finally:
        server.stop()
