"""Hot-swap under concurrent load, and a version that fails to load never replaces a good one."""

from __future__ import annotations

import copy
import threading
import time

import httpx
import numpy as np
import torch

from app.serving.models import load_model, register_model
from app.storage import Store
from tests.helpers.server import API_KEY

ADMIN = {"X-API-Key": API_KEY}


def _register_scaled(store: Store, scale: float) -> int:
    model, _ = load_model(store, 1)
    model = copy.deepcopy(model)
    with torch.no_grad():
        last = [m for m in model.estimator.net.blocks if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(scale)
        last.bias.add_(scale)
    return register_model(store, model, mode="qk", parent=1, metrics={"scale": scale})


def test_versions_swap_under_load_without_failures(server_factory) -> None:
    server = server_factory()
    store = Store(f"sqlite:///{server.data_dir / 'skqk.db'}")
    versions = [1, _register_scaled(store, 1.5), _register_scaled(store, 0.5)]
    x = np.random.default_rng(0).random((2, 64), dtype=np.float32)
    expected = {}
    for v in versions:
        model, _ = load_model(store, v)
        expected[v] = model(torch.from_numpy(x)).detach().numpy()
    store.dispose()

    results: list[tuple[int, np.ndarray]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client_loop(use_v2: bool) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                try:
                    if use_v2:
                        r = c.post("/v2/models/skqk/infer", json={"inputs": [
                            {"name": "input", "shape": [2, 64], "datatype": "FP32",
                             "data": x.reshape(-1).tolist()}], "outputs": [{"name": "logits"}]})
                        body = r.json()
                        version = int(body["model_version"])
                        out = np.array(body["outputs"][0]["data"], dtype=np.float32).reshape(2, -1)
                    else:
                        r = c.post("/predict", json={"inputs": x.tolist()})
                        body = r.json()
                        version, out = body["model_version"], np.array(body["outputs"], dtype=np.float32)
                    if r.status_code != 200:
                        failures.append(f"{r.status_code}: {r.text}")
                    else:
                        results.append((version, out))
                except Exception as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client_loop, args=(i % 2 == 1,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as admin:
            for i in range(12):
                time.sleep(0.15)
                target = versions[(i + 1) % 3]
                r = admin.post(f"/models/{target}/activate", headers=ADMIN)
                assert r.status_code == 200, r.text
                assert r.json()["serving_version"] == target
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    assert len(results) > 50
    seen = {v for v, _ in results}
    assert seen <= set(versions) and len(seen) == 3
    for version, out in results:  # a response's numbers come from the version it names, never a mix
        np.testing.assert_allclose(out, expected[version], rtol=1e-4, atol=1e-4)


def test_a_corrupt_version_is_never_served(server_factory) -> None:
    server = server_factory()
    store = Store(f"sqlite:///{server.data_dir / 'skqk.db'}")
    try:
        bad = _register_scaled(store, 2.0)
        weights = bytearray(store.get_version(bad).estimator_weights)
        weights[len(weights) // 2] ^= 0x01
        store._set_weights_for_tests(bad, estimator_weights=bytes(weights))
        with server.client() as c:
            r = c.post(f"/models/{bad}/activate", headers=ADMIN)
            assert r.status_code == 409 and "failed to load" in r.json()["error"]
            assert c.get("/models").headers["x-active-version"] == "1"
            # the pointer moves behind the server's back (e.g. another tool): it keeps version 1
            store.activate(bad, "test", "corrupt on purpose")
            time.sleep(1.5)  # > poll interval (0.5 s) twice
            for _ in range(5):
                r = c.post("/predict", json={"inputs": [[0.1] * 64]})
                assert r.status_code == 200 and r.json()["model_version"] == 1
            assert "skqk_model_load_failures_total 1.0" in c.get("/metrics").text
            # a good version activated afterwards is picked up by the poll
            good = _register_scaled(store, 1.1)
            store.activate(good, "test", "fixed")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if c.post("/predict", json={"inputs": [[0.1] * 64]}).json()["model_version"] == good:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("the poll did not pick up the good version")
    finally:
        store.dispose()
