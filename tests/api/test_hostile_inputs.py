"""Client mistakes found by attacking the service (issue 10, items 4 and 5) stay 4xx: huge
integers, out-of-range versions, control characters in keys, inputs that overflow the model."""

from __future__ import annotations

import httpx

from app.storage import Store
from tests.helpers.server import API_KEY

ADMIN = {"X-API-Key": API_KEY}
WIDTH = 64  # the template store's digits model


def v2_body(data_json: str, rows: int = 1) -> bytes:
    return (f'{{"inputs": [{{"name": "input", "shape": [{rows}, {WIDTH}], "datatype": "FP32", '
            f'"data": {data_json}}}]}}').encode()


def v2_json(row: list[float]) -> dict:
    return {"inputs": [{"name": "input", "shape": [1, WIDTH], "datatype": "FP32", "data": row}]}


def test_huge_integer_in_v2_data_is_422(client: httpx.Client) -> None:
    data = "[" + ", ".join(["9" * 400] + ["0"] * (WIDTH - 1)) + "]"
    r = client.post("/v2/models/skqk/infer", content=v2_body(data),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert "inputs[0].data" in r.json()["error"]


def test_versions_beyond_the_store_are_404(client: httpx.Client) -> None:
    row = [0.0] * WIDTH
    for version in ("99999999999999999999", "3000000000"):
        r = client.post(f"/v2/models/skqk/versions/{version}/infer", json=v2_json(row))
        assert r.status_code == 404, r.text
    r = client.post("/models/3000000000/activate", headers=ADMIN)
    assert r.status_code == 404 and "version" in r.json()["error"]


def test_control_characters_in_idempotency_key_are_refused(client: httpx.Client, server_store: Store) -> None:
    before = server_store.sample_count()
    r = client.post("/ingest", json={"samples": [{"features": [0.5] * WIDTH, "label": 1}],
                                     "idempotency_key": "batch\u00001"})
    assert r.status_code == 422 and "idempotency_key" in r.json()["error"], r.text
    assert server_store.sample_count() == before


def test_inputs_that_overflow_the_model_are_not_a_success(client: httpx.Client) -> None:
    huge = [3e38] * WIDTH
    r = client.post("/predict", json={"inputs": [[0.5] * WIDTH, huge]})
    assert r.status_code == 422, r.text
    assert "inputs[1]" in r.json()["error"] and "not finite" in r.json()["error"]
    r = client.post("/v2/models/skqk/infer", json=v2_json(huge))
    assert r.status_code == 422 and "not finite" in r.json()["error"], r.text
