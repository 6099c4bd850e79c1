"""Ingest is durable: every acknowledged batch survives a SIGKILL of the server.

Also the first-run path: ``skqk serve`` on an empty data dir bootstraps version 1 itself.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np

from app.storage import Store
from tests.helpers.server import ServerProcess, fast_env


def test_acknowledged_ingests_survive_sigkill_and_keys_stay_idempotent(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    server = ServerProcess(data_dir, fast_env(data_dir))
    try:
        server.start()  # empty store: bootstraps digits as version 1 before serving
        with server.client() as c:
            models = c.get("/models").json()
            assert models[0]["active"] and models[0]["metrics"]["dataset"] == "digits"
            base = c.post("/ingest", json={"samples": [{"features": [0.0] * 64, "label": 0}]}).json()
        base_total = base["total_samples"]
        assert base_total == 1797 + 1  # the bootstrap rows are stored as the "old data"

        rng = np.random.default_rng(0)
        acked: dict[str, int] = {}
        stop = threading.Event()

        def ingest_loop() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as c:
                i = 0
                while not stop.is_set():
                    n = int(rng.integers(1, 40))
                    samples = [{"features": rng.random(64).tolist(), "label": int(rng.integers(0, 10))}
                               for _ in range(n)]
                    key = f"k{i}"
                    i += 1
                    try:
                        r = c.post("/ingest", json={"samples": samples, "idempotency_key": key})
                    except httpx.HTTPError:
                        return  # the server died mid-request: not acknowledged
                    if r.status_code == 200:
                        acked[key] = n

        writer = threading.Thread(target=ingest_loop)
        writer.start()
        deadline = time.monotonic() + 30
        while len(acked) < 25 and time.monotonic() < deadline:
            time.sleep(0.02)
        server.kill()  # SIGKILL while the writer keeps sending
        stop.set()
        writer.join(15)
        assert len(acked) >= 25

        store = Store(f"sqlite:///{data_dir / 'skqk.db'}")
        try:
            for key, n in acked.items():
                batch = store.get_ingest_batch(key)
                assert batch is not None and batch["count"] == n, key
            total = store.sample_count()
            # every acknowledged row is there; at most one unacknowledged batch may have committed
            assert total >= base_total + sum(acked.values())
            assert total <= base_total + sum(acked.values()) + 40
        finally:
            store.dispose()

        server.start()  # same data dir: no second bootstrap, the rows are still there
        with server.client() as c:
            assert c.get("/models").headers["x-active-version"] == "1"
            key, n = next(iter(acked.items()))
            replay = c.post("/ingest", json={"samples": [{"features": [0.5] * 64, "label": 1}] * n,
                                             "idempotency_key": key})
            assert replay.status_code == 409  # the key is taken by the original payload
            after = c.post("/ingest", json={"samples": [{"features": [0.5] * 64, "label": 1}]}).json()
            assert after["total_samples"] == total + 1
    finally:
        server.stop()
