"""Every endpoint over real HTTP against a real uvicorn process: happy paths and client errors."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from app.serving.models import load_model
from app.storage import Store
from tests.api.conftest import SMALL_BODY_LIMIT
from tests.helpers.server import API_KEY

D = 64
ROW = [0.25] * D
JSON = {"Content-Type": "application/json"}
ADMIN = {"X-API-Key": API_KEY}


def _digits(n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data[:n] / 16.0).astype(np.float32), d.target[:n]


def _post_raw(client: httpx.Client, path: str, body: str | bytes,
              headers: dict | None = None) -> httpx.Response:
    return client.post(path, content=body, headers=headers if headers is not None else JSON)


def _error(r: httpx.Response) -> str:
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    return body["error"]


# ---- health, metadata ------------------------------------------------------------------------
def test_v2_server_health_and_model_metadata(client: httpx.Client) -> None:
    assert client.get("/v2").json()["name"] == "skqk-serve"
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2/models/skqk").json()
    assert meta["name"] == "skqk" and "1" in meta["versions"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, D]}]
    assert client.get("/v2/models/skqk/ready").json()["ready"] is True
    for path in ("/v2/models/nope", "/v2/models/nope/ready"):
        r = client.get(path)
        assert r.status_code == 404 and list(r.json()) == ["error"] and "nope" in r.json()["error"]


# ---- /predict ---------------------------------------------------------------------------------
def test_predict_matches_the_stored_model(client: httpx.Client, server_store: Store) -> None:
    x, _y = _digits(6)
    r = client.post("/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == 1
    model, _ = load_model(server_store, 1)
    import torch

    expected = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.array(body["outputs"]), expected, rtol=1e-4, atol=1e-4)
    assert body["predictions"] == expected.argmax(1).tolist()


@pytest.mark.parametrize(("payload", "status", "needle"), [
    ({"inputs": [ROW[:-1]]}, 422, "inputs[0]: expected 64 features, got 63"),
    ({"inputs": [ROW, [*ROW, 1.0]]}, 422, "inputs[1]: expected 64 features, got 65"),
    ({"inputs": []}, 422, "inputs: must contain at least one row"),
    ({"inputs": [[]]}, 422, "inputs[0]: expected 64 features, got 0"),
    ({"inputs": [["a", *ROW[1:]]]}, 422, "inputs[0][0]"),
    ({"inputs": [[True, *ROW[1:]]]}, 422, "inputs[0][0]"),
    ({"inputs": [[*ROW[:5], None, *ROW[6:]]]}, 422, "inputs[0][5]"),
    ({"inputs": ROW}, 422, "inputs[0]"),
    ({"inputs": "x"}, 422, "inputs"),
    ({"input": [ROW]}, 422, "inputs: Field required"),
    ({"inputs": [[*ROW[:-1], 1e+39]]}, 422, "inputs[0][63]: value is out of float32 range"),
])
def test_predict_rejects_bad_input(client: httpx.Client, payload: dict, status: int, needle: str) -> None:
    r = client.post("/predict", json=payload)
    assert r.status_code == status, r.text
    assert needle in _error(r)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_predict_rejects_non_finite_numbers(client: httpx.Client, token: str) -> None:
    body = '{"inputs": [[' + ", ".join(["0.1"] * 10 + [token] + ["0.1"] * 53) + "]]}"
    r = _post_raw(client, "/predict", body)
    assert r.status_code == 422 and "inputs[0][10]" in _error(r)


@pytest.mark.parametrize(("body", "status", "needle"), [
    ("{not json", 400, "not valid JSON"),
    ("", 400, "empty"),
    ("[1, 2]", 422, "object"),
])
def test_predict_rejects_malformed_bodies(client: httpx.Client, body: str, status: int, needle: str) -> None:
    r = _post_raw(client, "/predict", body)
    assert r.status_code == status and needle in _error(r)


# ---- content type and size -----------------------------------------------------------------------
WRONG_TYPES = [{"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}]


# v2 infer takes a body without Content-Type, as Triton does (tests/api/test_v2_binary.py)
@pytest.mark.parametrize(("path", "headers"), [
    *[(path, h) for path in ("/predict", "/ingest") for h in [*WRONG_TYPES, {}]],
    *[("/v2/models/skqk/infer", h) for h in WRONG_TYPES]])
def test_wrong_content_type_is_415(client: httpx.Client, server_store: Store, path: str,
                                   headers: dict) -> None:
    before = server_store.sample_count()
    body = json.dumps({"inputs": [ROW], "samples": [{"features": ROW, "label": 1}]})
    r = _post_raw(client, path, body, headers)
    assert r.status_code == 415 and "Content-Type must be application/json" in _error(r)
    assert server_store.sample_count() == before


@pytest.mark.parametrize("path", ["/predict", "/ingest", "/v2/models/skqk/infer"])
def test_body_over_the_limit_is_413(api_server, server_store: Store, path: str) -> None:
    before = server_store.sample_count()
    rows = SMALL_BODY_LIMIT // (len(json.dumps(ROW)) + 2) + 10
    samples = [{"features": ROW, "label": 1} for _ in range(rows)]
    body = json.dumps({"inputs": [ROW] * rows, "samples": samples}).encode()
    assert len(body) > SMALL_BODY_LIMIT
    with api_server.client() as c:  # the server closes the connection after a 413
        r = _post_raw(c, path, body)
    assert r.status_code == 413 and "exceeds the limit" in _error(r)
    with api_server.client() as c:  # chunked (no Content-Length): counted while reading

        def chunks():
            for i in range(0, len(body), 16384):
                yield body[i:i + 16384]

        r = c.post(path, content=chunks(), headers=JSON)
    assert r.status_code == 413 and "exceeds the limit" in _error(r)
    assert server_store.sample_count() == before


# ---- v2 infer ---------------------------------------------------------------------------------------
def _v2(data, shape=(1, D), datatype="FP32", **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(shape), "datatype": datatype, "data": data}], **extra}


def test_v2_infer_flat_nested_and_per_version(client: httpx.Client) -> None:
    x, _ = _digits(3)
    flat = client.post("/v2/models/skqk/infer", json=_v2(x.reshape(-1).tolist(), (3, D), id="req-1"))
    assert flat.status_code == 200, flat.text
    body = flat.json()
    assert body["model_name"] == "skqk" and body["model_version"] == "1" and body["id"] == "req-1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["logits"]["shape"] == [3, 10] and len(outputs["logits"]["data"]) == 30
    assert outputs["logits"]["datatype"] == "FP32" and outputs["predictions"]["datatype"] == "INT64"
    nested = client.post("/v2/models/skqk/infer", json=_v2(x.tolist(), (3, D))).json()
    assert nested["outputs"] == body["outputs"]
    pinned = client.post("/v2/models/skqk/versions/1/infer",
                         json=_v2(x.tolist(), (3, D), outputs=[{"name": "predictions"}])).json()
    assert [o["name"] for o in pinned["outputs"]] == ["predictions"]
    assert pinned["outputs"][0]["data"] == outputs["predictions"]["data"]
    predict = client.post("/predict", json={"inputs": x.tolist()}).json()
    assert predict["predictions"] == outputs["predictions"]["data"]


@pytest.mark.parametrize(("payload", "needle"), [
    (_v2(ROW, datatype="INT64"), "inputs[0].datatype: only FP32 is supported, got 'INT64'"),
    (_v2(ROW, datatype="BYTES"), "inputs[0].datatype"),
    (_v2(ROW, shape=(2, D)), "shape [2, 64] needs 128 values, got 64"),
    (_v2(ROW + ROW, shape=(1, D)), "shape [1, 64] needs 64 values, got 128"),
    (_v2(ROW[:32], shape=(1, 32)), "inputs[0].shape: [1, 32] has 32 features per row; the model takes 64"),
    (_v2([], shape=(0, D)), "inputs[0].shape: needs at least one row"),
    (_v2(["x", *ROW[1:]]), "inputs[0].data[0]: expected a number, got str"),
    (_v2([True, *ROW[1:]]), "inputs[0].data[0]: expected a number, got bool"),
    ({"inputs": []}, "inputs: exactly one input tensor expected, got 0"),
    ({"inputs": [{"name": "input", "shape": [1, D], "datatype": "FP32"}]}, "inputs[0].data: Field required"),
    ({"inputs": [{"name": "input", "shape": [-1, D], "datatype": "FP32", "data": ROW}]},
     "inputs[0].shape[0]"),
    (_v2(ROW, outputs=[{"name": "probabilities"}]), "outputs[0].name: unknown output 'probabilities'"),
])
def test_v2_infer_rejects_bad_requests(client: httpx.Client, payload: dict, needle: str) -> None:
    r = client.post("/v2/models/skqk/infer", json=payload)
    assert r.status_code == 422, r.text
    assert list(r.json()) == ["error"]  # the v2 error shape, exactly
    assert needle in r.json()["error"]


def test_v2_infer_rejects_non_finite_and_unknown_versions(client: httpx.Client) -> None:
    body = ('{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [NaN'
            + ", 0" * 63 + "]}]}")
    r = _post_raw(client, "/v2/models/skqk/infer", body)
    assert r.status_code == 422 and "inputs[0].data[0]: value is not a finite number" in _error(r)
    for path, needle in (("/v2/models/skqk/versions/99/infer", "version 99 not found"),
                         ("/v2/models/skqk/versions/abc/infer", "'abc' not found"),
                         ("/v2/models/other/infer", "unknown model 'other'")):
        r = client.post(path, json=_v2(ROW))
        assert r.status_code == 404 and needle in _error(r) and list(r.json()) == ["error"]
    r = _post_raw(client, "/v2/models/skqk/infer", "{oops")
    assert r.status_code == 400 and list(r.json()) == ["error"]


# ---- /ingest ---------------------------------------------------------------------------------------
def test_ingest_commits_and_repeated_key_is_a_no_op(client: httpx.Client, server_store: Store) -> None:
    x, y = _digits(4)
    samples = [{"features": f.tolist(), "label": int(lbl)} for f, lbl in zip(x, y, strict=True)]
    before = server_store.sample_count()
    first = client.post("/ingest", json={"samples": samples, "idempotency_key": "batch-A"})
    assert first.status_code == 200, first.text
    assert first.json() == {"accepted": 4, "total_samples": before + 4, "duplicate": False}
    assert server_store.sample_count() == before + 4  # committed before the answer
    again = client.post("/ingest", json={"samples": samples, "idempotency_key": "batch-A"})
    assert again.status_code == 200  # the same keys; nothing stored now, so accepted 0 (was 4)
    assert again.json() == {"accepted": 0, "total_samples": before + 4, "duplicate": True}
    assert server_store.sample_count() == before + 4
    samples[0]["label"] = (samples[0]["label"] + 1) % 10
    conflict = client.post("/ingest", json={"samples": samples, "idempotency_key": "batch-A"})
    assert conflict.status_code == 409 and "idempotency_key" in _error(conflict)
    no_key = client.post("/ingest", json={"samples": samples[:2]})
    assert no_key.status_code == 200 and no_key.json()["accepted"] == 2


GOOD = {"features": ROW, "label": 3}


@pytest.mark.parametrize(("payload", "needle"), [
    ({"samples": [GOOD, {"features": ROW[:10], "label": 1}]},
     "samples[1].features: expected 64 features, got 10"),
    ({"samples": [{"features": ROW, "label": 10}]}, "samples[0].label: must be in [0, 9], got 10"),
    ({"samples": [{"features": ROW, "label": -1}]}, "samples[0].label: must be in [0, 9], got -1"),
    ({"samples": [{"features": ROW, "label": 1.5}]}, "samples[0].label"),
    ({"samples": [{"features": ROW, "label": "3"}]}, "samples[0].label"),
    ({"samples": [{"features": ROW}]}, "samples[0].label: Field required"),
    ({"samples": [{"features": ["x"] * D, "label": 1}]}, "samples[0].features[0]"),
    ({"samples": [GOOD, {"features": [*ROW[:63], 1e+39], "label": 1}]}, "out of float32 range"),
    ({"samples": []}, "samples: must contain at least one sample"),
    ({"samples": [GOOD], "idempotency_key": ""}, "idempotency_key"),
    ({"samples": GOOD}, "samples"),
    ({}, "samples: Field required"),
])
def test_ingest_rejects_bad_samples_and_stores_nothing(client: httpx.Client, server_store: Store,
                                                       payload: dict, needle: str) -> None:
    before = server_store.sample_count()
    r = client.post("/ingest", json=payload)
    assert r.status_code == 422, r.text
    assert needle in _error(r)
    assert server_store.sample_count() == before


def test_ingest_rejects_nan_and_stores_nothing(client: httpx.Client, server_store: Store) -> None:
    before = server_store.sample_count()
    good = ", ".join(["0.5"] * D)
    body = ('{"samples": [{"features": [' + good + '], "label": 1}, {"features": [Infinity'
            + ", 0.5" * (D - 1) + '], "label": 2}]}')
    r = _post_raw(client, "/ingest", body)
    assert r.status_code == 422 and "samples[1].features[0]" in _error(r)
    assert server_store.sample_count() == before


# ---- admin: auth, retrain, models ----------------------------------------------------------------
@pytest.mark.parametrize(("method", "path"), [("POST", "/retrain"), ("POST", "/models/1/activate")])
@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}])
def test_admin_endpoints_need_the_key(client: httpx.Client, method: str, path: str, headers: dict) -> None:
    r = client.request(method, path, json={"mode": "qk"}, headers=headers)
    assert r.status_code == 401 and "X-API-Key" in _error(r)


def test_retrain_validation_and_unknown_jobs(client: httpx.Client) -> None:
    r = client.post("/retrain", json={"mode": "sideways"}, headers=ADMIN)
    assert r.status_code == 422 and "mode" in _error(r)
    r = client.get("/retrain/does-not-exist")
    assert r.status_code == 404 and "does-not-exist" in _error(r)


def test_models_listing_and_activation(client: httpx.Client) -> None:
    r = client.get("/models")
    listing = r.json()
    assert isinstance(listing, list) and r.headers["x-active-version"] == "1"
    assert [v["version"] for v in listing if v["active"]] == [1]
    v1 = next(v for v in listing if v["version"] == 1)
    assert v1["active"] is True and v1["mode"] == "full" and v1["parent"] is None
    assert "holdout_acc" in v1["metrics"] and v1["created_at"]
    r = client.post("/models/1/activate", headers=ADMIN)
    assert r.status_code == 200 and r.json()["active_version"] == 1
    r = client.post("/models/4242/activate", headers=ADMIN)
    assert r.status_code == 404 and "4242" in _error(r)
    r = client.post("/models/abc/activate", headers=ADMIN)
    assert r.status_code == 422 and "version" in _error(r)


# ---- misc -------------------------------------------------------------------------------------------
def test_unknown_routes_and_methods_are_json_errors(client: httpx.Client) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and "/nope" in _error(r)
    r = client.get("/predict")
    assert r.status_code == 405 and _error(r)


def test_metrics_exposition(client: httpx.Client) -> None:
    client.post("/predict", json={"inputs": [ROW]})
    text = client.get("/metrics").text
    for name in ("skqk_request_latency_seconds_bucket", "skqk_batch_queue_seconds_bucket",
                 "skqk_batch_size_rows_bucket", "skqk_requests_in_flight", "skqk_model_version 1.0",
                 "skqk_http_ingest_samples_total", "skqk_model_swaps_total", "skqk_retrain_jobs",
                 'route="/predict"'):
        assert name in text, name
