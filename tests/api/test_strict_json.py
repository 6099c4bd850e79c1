"""Strict JSON: a key given twice in one object is a 400 naming it and where, on every JSON body.

Over HTTP against a real server: ``/predict`` (its fast path and its validating path), v2
infer, ``/ingest``, ``/retrain``, ``/models/{v}/activate`` and the sample admin; nothing is
stored, no job starts, nothing is activated. Keys and strings that merely contain ``:`` are
not mistaken for duplicates. Below: the detector itself (the usual bodies never reach its
slower exact check; where it cannot check, it refuses).
"""

from __future__ import annotations

import sqlite3

import httpx
import orjson
import pytest

from app.api.errors import ApiError, parse_body
from app.api.schemas import IngestRequest, RetrainRequest, V2InferRequest
from app.api.strict_json import duplicate_key_message, may_have_duplicate_keys
from tests.helpers.server import API_KEY, ServerProcess

D = 64
ROW = ",".join(["0.25"] * D)
JSON = {"Content-Type": "application/json"}
ADMIN = {**JSON, "X-API-Key": API_KEY}
TENSOR = '"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [' + ROW + "]"
NAMED = ", ".join(f'"f{i}": 0.25' for i in range(D))
TABLES = ("samples", "retrain_jobs", "promotions", "sample_audit", "model_versions")


def _counts(server: ServerProcess) -> dict[str, int]:
    with sqlite3.connect(server.data_dir / "skqk.db") as db:  # the server's own store
        return {t: int(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in TABLES}


@pytest.mark.parametrize(("path", "body", "message"), [
    # the usual /predict body (served by the fast path): the last "inputs" would be served
    ("/predict", '{"inputs": [[0.5]], "inputs": [[' + ROW + "]]}", 'body: duplicate key "inputs"'),
    ("/predict", '{"inputs": [{' + NAMED + ', "f3": 9.0}]}', 'inputs[0]: duplicate key "f3"'),
    ("/v2/models/skqk/infer", '{"inputs": [{' + TENSOR + ', "datatype": "INT64"}]}',
     'inputs[0]: duplicate key "datatype"'),
    ("/v2/models/skqk/versions/1/infer", '{"id": "a", "id": "b", "inputs": [{' + TENSOR + "}]}",
     'body: duplicate key "id"'),
    ("/ingest", '{"samples": [{"features": [' + ROW + '], "label": 99, "label": 1}]}',
     'samples[0]: duplicate key "label"'),
    ("/ingest", '{"samples": [{"features": [' + ROW + '], "label": 1}, {"features": {' + NAMED
     + ', "f0": 1.0}, "label": 2}]}', 'samples[1].features: duplicate key "f0"'),
    ("/ingest", '{"samples": [{"features": [' + ROW + '], "label": 1}], "idempotency_key": "k1", '
     '"idempotency_key": "k2"}', 'body: duplicate key "idempotency_key"'),
    ("/retrain", '{"mode": "full", "mode": "qk"}', 'body: duplicate key "mode"'),
    ("/models/1/activate", '{"reason": "a", "reason": "b"}', 'body: duplicate key "reason"'),
    ("/samples/quarantine", '{"ids": [1], "ids": [2]}', 'body: duplicate key "ids"'),
])
def test_duplicate_keys_are_refused_naming_key_and_place(api_server: ServerProcess, client: httpx.Client,
                                                         path: str, body: str, message: str) -> None:
    before = _counts(api_server)
    r = client.post(path, content=body, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == message
    if path.startswith("/v2"):
        assert list(r.json()) == ["error"]  # the Open Inference Protocol's error shape
    assert _counts(api_server) == before  # nothing stored, no job, no activation, no audit row


def test_a_duplicate_is_reported_before_other_problems(client: httpx.Client) -> None:
    r = client.post("/ingest", content='{"samples": [{"features": [1], "label": "x", "label": 1}]}',
                    headers=JSON)
    assert r.status_code == 400 and r.json()["error"] == 'samples[0]: duplicate key "label"'
    r = client.post("/retrain", content='{"mode": "qk", "mode": "turbo"}', headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"] == 'body: duplicate key "mode"'


def test_only_real_duplicates_are_refused(api_server: ServerProcess, client: httpx.Client) -> None:
    """Colons inside keys and strings are no duplicates: the same body without the twin is stored."""
    before = _counts(api_server)["samples"]
    sample = '{"features": [' + ROW + '], "label": 3}'
    samples = '{"samples": [' + sample + ", " + sample + '], "idempotency_key": "batch:2026-11-27T10:00"'
    r = client.post("/ingest", content=samples + ', "note:": "a:b", "note:": "c"}', headers=JSON)
    assert r.status_code == 400 and r.json()["error"] == 'body: duplicate key "note:"', r.text
    r = client.post("/ingest", content=samples + ', "note:": "a:b"}', headers=JSON)
    assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
    assert _counts(api_server)["samples"] == before + 2
    twin = '{"id": "a:b:c", "id": "x", "inputs": [{' + TENSOR + "}]}"
    r = client.post("/v2/models/skqk/infer", content=twin, headers=JSON)
    assert r.status_code == 400, r.text
    r = client.post("/v2/models/skqk/infer", content='{"id": "a:b:c", "inputs": [{' + TENSOR + "}]}",
                    headers=JSON)
    assert r.status_code == 200 and r.json()["id"] == "a:b:c", r.text


@pytest.mark.parametrize("body", ['"a:b:c"', '["a:b", "c:d"]', '[{"k": 1, "k": 2}]'])
def test_bodies_that_are_not_objects_are_a_4xx(client: httpx.Client, body: str) -> None:
    """Regression: a bare string with colons once reached the key counter and crashed (500)."""
    for path in ("/predict", "/ingest", "/v2/models/skqk/infer"):
        r = client.post(path, content=body, headers=JSON)
        expected = 400 if '"k"' in body else 422  # a duplicate is reported first
        assert r.status_code == expected, (path, r.text)


# ---- the detector ---------------------------------------------------------------------------------
def _v2(rows: int) -> bytes:
    return orjson.dumps({"id": "r", "inputs": [{"name": "input", "shape": [rows, D], "datatype": "FP32",
                                                "data": [0.25] * (rows * D)}]})


@pytest.mark.parametrize("rows", [1, 1024])
def test_the_usual_bodies_never_take_the_exact_check(rows: int) -> None:
    predict = orjson.dumps({"inputs": [[0.25] * D] * rows})
    assert not may_have_duplicate_keys(predict, orjson.loads(predict))
    v2 = _v2(rows)
    assert not may_have_duplicate_keys(v2, V2InferRequest.model_validate_json(v2))
    ingest = orjson.dumps({"samples": [{"features": [0.25] * D, "label": 1}] * rows, "idempotency_key": "k"})
    assert not may_have_duplicate_keys(ingest, IngestRequest.model_validate_json(ingest))


def test_the_exact_check_names_the_first_duplicate_in_document_order() -> None:
    body = b'{"a": [{"x": 1}, {"y": {"z": 1, "z": 2}}], "a b": {"k": 1, "k": 2}}'
    assert may_have_duplicate_keys(body, orjson.loads(body))
    assert duplicate_key_message(body) == 'a[1].y: duplicate key "z"'
    assert duplicate_key_message(b'{"a b": {"k": 1, "k": 2}}') == "['a b']: duplicate key \"k\""
    assert duplicate_key_message(b'{"k": "x:y", "n": {"k": "1:2"}}') is None  # colons in strings only
    # integers of any length are not converted (no digit limit), so the check still runs
    assert duplicate_key_message(b'{"n": ' + b"9" * 5000 + b', "n": 1}') == 'body: duplicate key "n"'


def test_what_cannot_be_checked_is_refused() -> None:
    deep = b'{"a": 1, "b": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert duplicate_key_message(deep) == "body: nested too deeply to check for duplicate keys"


def test_parse_body_refuses_duplicates_of_valid_and_invalid_bodies() -> None:
    with pytest.raises(ApiError) as valid:
        parse_body(RetrainRequest, b'{"mode": "qk", "mode": "full"}')
    with pytest.raises(ApiError) as invalid:
        parse_body(RetrainRequest, b'{"mode": "qk", "mode": "bogus"}')
    assert (valid.value.status, invalid.value.status) == (400, 400)
    assert parse_body(RetrainRequest, b'{"mode": "full"}').mode == "full"
