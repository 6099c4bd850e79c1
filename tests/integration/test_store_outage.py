"""A frozen Postgres (SIGSTOP of the postmaster and every backend) against a real ``skqk serve``:
store endpoints answer 503 + Retry-After naming the store within a bound, serving and model
readiness go on, the store's own health says 503, and everything recovers after SIGCONT.

The cluster is a private one (initdb into a temp dir, its own port): the shared server must
never be frozen. Timeouts are small here; the client's timeout (BOUND_S) is the functional
bound: without the store timeouts these requests wait until the server is thawed.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest

from tests.helpers.private_pg import PrivateCluster, pg_bin_dir
from tests.helpers.server import ServerProcess, fast_env

pytestmark = pytest.mark.integration

STORE_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 2  # libpq's least
HEALTH_TIMEOUT_S = 1.0
BOUND_S = 3 * (STORE_TIMEOUT_S + CONNECT_TIMEOUT_S)  # a checkout, or a reconnect, times three


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed")
    c = PrivateCluster(bin_dir)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def server(cluster: PrivateCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("outage")
    env = fast_env(data_dir, SKQK_DATABASE_URL=cluster.url, SKQK_STORE_TIMEOUT_S=STORE_TIMEOUT_S,
                   SKQK_DB_CONNECT_TIMEOUT_S=CONNECT_TIMEOUT_S, SKQK_DB_POOL_TIMEOUT_S=2,
                   SKQK_STORE_HEALTH_TIMEOUT_S=HEALTH_TIMEOUT_S, SKQK_BOOTSTRAP_EPOCHS=2)
    with ServerProcess(data_dir, env) as s:  # bootstraps version 1 into the empty cluster
        yield s


def _digits(n: int) -> list[list[float]]:
    from sklearn.datasets import load_digits

    return (load_digits().data[:n] / 16.0).astype(np.float32).tolist()


def _ingest(c: httpx.Client, i: int) -> httpx.Response:
    return c.post("/ingest", json={"samples": [{"features": _digits(i + 1)[i], "label": i % 10}]})


def _metrics(c: httpx.Client, *names: str) -> list[float]:
    r = c.get("/metrics")
    assert r.status_code == 200, r.text
    found = [re.search(rf"^{name} (\S+)$", r.text, re.MULTILINE) for name in names]
    assert all(found), (names, r.text[-2000:])
    return [float(m.group(1)) for m in found if m]


def _timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = call()
    return r, time.monotonic() - started


def _wait_for(call: Callable[[], httpx.Response], status: int, timeout: float = 60) -> float:
    started = time.monotonic()
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if call().status_code == status:
                return time.monotonic() - started
        assert time.monotonic() < started + timeout, f"no {status} within {timeout}s"
        time.sleep(0.1)


def test_a_frozen_store_gives_fast_503s_while_serving_goes_on(cluster: PrivateCluster,
                                                              server: ServerProcess) -> None:
    x = _digits(2)
    with server.client(timeout=BOUND_S) as c:
        assert _ingest(c, 0).status_code == 200
        assert c.get("/health/store").status_code == 200
        samples, up = _metrics(c, "skqk_samples_total", "skqk_store_up")
        assert up == 1

        cluster.freeze()
        try:
            timings = {}
            for name, call in [("/ingest", lambda: _ingest(c, 1)), ("/models", lambda: c.get("/models")),
                               ("/samples/count", lambda: c.get("/samples/count"))]:
                r, timings[name] = _timed(call)  # httpx.ReadTimeout here: the request hung
                assert r.status_code == 503, (name, r.text)
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"].startswith("sample store unavailable: "), r.text
            health = c.get("/health/store")
            assert health.status_code == 503 and "sample store unavailable" in health.json()["error"]
            assert health.headers["retry-after"] == "1"
            # metrics answer, keep the store-derived values and say the store is down
            assert _metrics(c, "skqk_samples_total", "skqk_store_up") == [samples, 0]
            # the model is in memory: predictions and model readiness do not need the store
            r = c.post("/predict", json={"inputs": x})
            assert r.status_code == 200, r.text
            assert c.get("/v2/health/ready").status_code == 200
            assert c.get("/v2/models/skqk/ready").status_code == 200
        finally:
            cluster.thaw()
        print(f"\ntime to 503 with the store frozen: {timings}")

        recovery = _wait_for(lambda: c.get("/health/store"), 200)
        print(f"store health back to 200 {recovery:.2f}s after SIGCONT")
        r = _ingest(c, 3)
        assert r.status_code == 200, r.text
        assert _metrics(c, "skqk_store_up") == [1]
        assert c.get("/samples/count").json()["total"] >= samples + 1
