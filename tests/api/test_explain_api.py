"""/explain, the v2 explain extension and KServe v1 :explain against a real server (digits, 64 features)."""

from __future__ import annotations

import copy
import threading
import time

import httpx
import numpy as np
import torch

from app.core.explain import cost_per_row
from app.serving.models import load_model, register_model
from app.storage import Store
from tests.helpers.server import API_KEY

ADMIN = {"X-API-Key": API_KEY}
ROWS = np.random.default_rng(3).random((4, 64)).astype(np.float32) * 16  # digits pixels: 0..16


def _check_identity(row: dict) -> None:
    for out in row["outputs"]:
        total = out["intercept"] + sum(out["contributions"].values())
        scale = abs(out["intercept"]) + sum(abs(v) for v in out["contributions"].values())
        assert abs(total - out["value"]) <= 1e-5 * scale, (total, out["value"])


def test_explain_matches_predict_and_sums_exactly(client: httpx.Client) -> None:
    pred = client.post("/predict", json={"inputs": ROWS.tolist()}).json()
    r = client.post("/explain", json={"inputs": ROWS.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == pred["model_version"]
    assert body["reference"]["source"] == "training_mean"  # stored with the version at bootstrap
    assert list(body["reference"]["values"]) == [f"f{j}" for j in range(64)]
    assert len(body["explanations"]) == len(ROWS)
    for i, row in enumerate(body["explanations"]):
        assert row["prediction"] == pred["predictions"][i]
        (out,) = row["outputs"]  # default: the predicted class
        assert out["output"] == row["prediction"]
        assert np.isclose(out["value"], pred["outputs"][i][row["prediction_index"]], rtol=1e-4, atol=1e-4)
        assert list(out["contributions"]) == [f"f{j}" for j in range(64)]
        _check_identity(row)
        assert 0 < row["active_units"] <= row["total_units"]
        radius = row["certified_radius"]
        assert radius["l2"] > 0 and 0 < radius["linf"] <= radius["l2"]


def test_reference_and_outputs_options(client: httpx.Client) -> None:
    x = ROWS[:2].tolist()
    every = client.post("/explain", json={"inputs": x, "outputs": "all"}).json()["explanations"]
    assert [o["output"] for o in every[0]["outputs"]] == list(range(10))
    for row in every:
        _check_identity(row)
    three = client.post("/explain", json={"inputs": x, "outputs": 3, "reference": "zero"}).json()
    assert three["reference"]["source"] == "zero"
    zero_out = three["explanations"][0]["outputs"][0]
    assert zero_out["output"] == 3 and zero_out["value"] == every[0]["outputs"][3]["value"]
    # radius: false: the same numbers without the certified radius
    quick = client.post("/explain", json={"inputs": x, "outputs": "all", "radius": False}).json()
    quick = quick["explanations"]
    for a, b in zip(quick, every, strict=True):
        assert a["certified_radius"] == {"l2": None, "linf": None}
        for oa, ob in zip(a["outputs"], b["outputs"], strict=True):
            assert np.allclose(list(oa["contributions"].values()), list(ob["contributions"].values()),
                               rtol=1e-4, atol=1e-5)
            assert np.isclose(oa["intercept"], ob["intercept"], rtol=1e-4, atol=1e-5)
        _check_identity(a)
    assert client.post("/explain", json={"inputs": x, "radius": "no"}).status_code == 422
    # the row itself as reference: every contribution is 0 and the intercept is the output
    named = {f"f{j}": v for j, v in enumerate(x[0])}
    own = client.post("/explain", json={"inputs": [named], "reference": named}).json()
    assert own["reference"]["source"] == "client"
    out = own["explanations"][0]["outputs"][0]
    assert all(v == 0 for v in out["contributions"].values())
    assert np.isclose(out["intercept"], out["value"], rtol=1e-5, atol=1e-6)


def test_bad_explain_requests_name_the_field(client: httpx.Client) -> None:
    x = ROWS[:1].tolist()
    cases = [({"inputs": x, "reference": "median"}, "reference"),
             ({"inputs": x, "reference": [1.0] * 3}, "reference"),
             ({"inputs": x, "reference": 5}, "reference"),
             ({"inputs": x, "outputs": 10}, "outputs"),
             ({"inputs": x, "outputs": "cat"}, "outputs"),
             ({"inputs": x, "outputs": True}, "outputs"),
             ({"inputs": x, "refrence": "zero"}, "refrence"),
             ({"inputs": []}, "inputs"),
             ({"inputs": [[1.0] * 63]}, "inputs[0]")]
    for body, field in cases:
        r = client.post("/explain", json=body)
        assert r.status_code == 422, (body, r.text)
        assert field in r.json()["error"], (field, r.json())
    assert client.post("/v1/models/other:explain", json={"instances": x}).status_code == 404


def test_kserve_v1_explain_shape(client: httpx.Client) -> None:
    r = client.post("/v1/models/skqk:explain", json={"instances": ROWS[:3].tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"predictions", "explanations"}  # KServe v1: {"predictions": [], "explanations": []}
    assert len(body["predictions"]) == len(body["explanations"]) == 3
    direct = client.post("/explain", json={"inputs": ROWS[:3].tolist()}).json()["explanations"]
    assert body["explanations"] == direct
    assert client.post("/v1/models/skqk:explain", json={"inputs": ROWS[:1].tolist()}).status_code == 200
    assert client.post("/v1/models/skqk:explain", json={}).status_code == 422


def test_v2_explain_extension(client: httpx.Client) -> None:
    assert "explain" in client.get("/v2").json()["extensions"]
    req = {"id": "e1", "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                   "data": ROWS[:2].reshape(-1).tolist()}],
           "parameters": {"outputs": "all"}}
    for path in ("/v2/models/skqk/explain", "/v2/models/skqk/versions/1/explain"):
        r = client.post(path, json=req)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == "e1" and body["model_version"] == "1"
        tensors = {t["name"]: t for t in body["outputs"]}
        assert tensors["contributions"]["shape"] == [2, 10, 64]
        assert tensors["intercept"]["shape"] == [2, 10] and tensors["radius_l2"]["shape"] == [2]
        c = np.asarray(tensors["contributions"]["data"]).reshape(2, 10, 64)
        b = np.asarray(tensors["intercept"]["data"]).reshape(2, 10)
        v = np.asarray(tensors["output_values"]["data"]).reshape(2, 10)
        np.testing.assert_allclose(b + c.sum(-1), v, rtol=1e-5, atol=1e-5)
        assert body["parameters"]["feature_names"][0] == "f0"
    r = client.post("/v2/models/skqk/explain", json={**req, "parameters": {"outputs": 11}})
    assert r.status_code == 422 and "parameters.outputs" in r.json()["error"]
    assert client.post("/v2/models/skqk/versions/99/explain", json=req).status_code == 404


def _register_scaled(store: Store, scale: float, schema_kept: bool) -> int:
    model, record = load_model(store, 1)
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.estimator.net.readout.weight.mul_(scale)
        model.estimator.net.readout.bias.add_(scale)
    from app.serving.models import schema_of

    schema = schema_of(record) if schema_kept else None  # None: a version stored before references
    return register_model(store, model, mode="qk", parent=1, metrics={"scale": scale}, schema=schema)


def test_hot_swaps_never_mix_versions_and_the_size_cap(server_factory, template_data_dir) -> None:
    template = Store(f"sqlite:///{template_data_dir / 'skqk.db'}")
    per_row = cost_per_row(load_model(template, 1)[0].spec)
    template.dispose()
    server = None
    store = None
    try:
        server = server_factory(explain_max_elements=per_row * 40)
        store = Store(f"sqlite:///{server.data_dir / 'skqk.db'}")
        versions = [1, _register_scaled(store, 1.5, True), _register_scaled(store, 0.5, False)]
        x = np.random.default_rng(1).random((32, 64), dtype=np.float32) * 16
        expected = {}
        for v in versions:
            model, _ = load_model(store, v)
            expected[v] = model(torch.from_numpy(x)).detach().numpy()
    finally:
        if store is not None:
            store.dispose()
    assert server is not None
    with server.client() as c:
        r = c.post("/explain", json={"inputs": np.zeros((41, 64)).tolist()})
        assert r.status_code == 413 and "SKQK_EXPLAIN_MAX_ELEMENTS" in r.json()["error"]
        assert "at most 40 rows" in r.json()["error"]
        # the version without a stored reference (and no normalisation) says it fell back to zero
        old = c.post(f"/v2/models/skqk/versions/{versions[2]}/explain", json={"inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x[0].tolist()}]}).json()
        assert old["parameters"]["reference"]["source"] == "zero"

    results: list[tuple[int, np.ndarray]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as cl:
            while not stop.is_set():
                try:
                    r = cl.post("/explain", json={"inputs": x.tolist(), "outputs": "all"})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code}: {r.text}")
                        continue
                    body = r.json()
                    values = np.array([[o["value"] for o in row["outputs"]] for row in body["explanations"]])
                    results.append((body["model_version"], values))
                except Exception as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client_loop) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as admin:
            for i in range(9):
                time.sleep(0.3)
                r = admin.post(f"/models/{versions[(i + 1) % 3]}/activate", headers=ADMIN)
                assert r.status_code == 200, r.text
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures[:3]
    assert len({v for v, _ in results}) >= 2, [v for v, _ in results]
    for version, values in results:  # every row of a response from the version it names
        np.testing.assert_allclose(values, expected[version], rtol=1e-4, atol=1e-4)
