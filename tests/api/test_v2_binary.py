"""The binary tensor data extension on the wire, byte by byte, over real HTTP (no client library).

Checks the exact framing (JSON part, then little-endian tensors; BYTES as 4-byte length +
UTF-8), the Content-Type rules of the v2 routes, and that every badly framed body is a 400
naming the header or the input (NaN/inf a 422) while the server keeps serving; with the
inference fast path on and with ``SKQK_FAST_PATH=false``.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers.server import ServerProcess
from tests.helpers.v2_model import CLASSES, FEATURES, ROWS, start_classifier_server

INFER = "/v2/models/skqk/infer"
HEADER = "Inference-Header-Content-Length"
OCTET = {"Content-Type": "application/octet-stream"}
X = np.array(ROWS, dtype=np.float32)
N, D = X.shape


@pytest.fixture(scope="module", params=["fast path", "FastAPI routes"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    server = start_classifier_server(tmp_path_factory.mktemp("v2bin"), fast_path=request.param == "fast path")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def _tensor(x: np.ndarray, name: str = "input", **parameters: Any) -> dict[str, Any]:
    return {"name": name, "shape": list(x.shape), "datatype": "FP32",
            "parameters": {"binary_data_size": x.nbytes, **parameters}}


def _framed(request: dict[str, Any], *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(request).encode()
    return head + b"".join(tensors), {**OCTET, HEADER: str(len(head))}


def _split(r: httpx.Response) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A binary answer → (its JSON part, each binary output's bytes by name)."""
    assert r.headers["content-type"] == "application/octet-stream", r.headers
    length = int(r.headers[HEADER])
    head = json.loads(r.content[:length])
    blobs, at = {}, length
    for out in head["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            blobs[out["name"]] = r.content[at:at + size]
            at += size
    assert at == len(r.content)
    return head, blobs


def _bytes_elements(blob: bytes) -> list[str]:
    out, at = [], 0
    while at < len(blob):
        (n,) = struct.unpack_from("<I", blob, at)
        out.append(blob[at + 4:at + 4 + n].decode())
        at += 4 + n
    return out


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json" and list(r.json()) == ["error"], r.text
    return r.json()["error"]


@pytest.fixture(scope="module")
def predicted(client: httpx.Client) -> dict[str, Any]:
    r = client.post("/predict", json={"inputs": ROWS})
    assert r.status_code == 200, r.text
    return r.json()


# ---- the wire format -------------------------------------------------------------------------------
def test_binary_in_binary_out_byte_for_byte(client: httpx.Client, predicted: dict[str, Any]) -> None:
    request = {"id": "b-1", "inputs": [_tensor(X)],
               "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in
                           ("logits", "predictions", "prediction_indices")]}
    body, headers = _framed(request, X.astype("<f4").tobytes())
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 200, r.text
    head, blobs = _split(r)
    assert head["id"] == "b-1" and head["model_version"] == "1"
    assert head["outputs"] == [
        {"name": "logits", "shape": [N, len(CLASSES)], "datatype": "FP32",
         "parameters": {"binary_data_size": N * len(CLASSES) * 4}},
        {"name": "predictions", "shape": [N], "datatype": "BYTES",
         "parameters": {"binary_data_size": len(blobs["predictions"])}},
        {"name": "prediction_indices", "shape": [N], "datatype": "INT64",
         "parameters": {"binary_data_size": N * 8}}]
    logits = np.frombuffer(blobs["logits"], "<f4").reshape(N, len(CLASSES))
    np.testing.assert_array_equal(logits, np.array(predicted["outputs"], dtype=np.float32))
    assert _bytes_elements(blobs["predictions"]) == predicted["predictions"]
    assert np.frombuffer(blobs["prediction_indices"], "<i8").tolist() == predicted["prediction_indices"]


def test_binary_output_flags_and_json_answers(client: httpx.Client, predicted: dict[str, Any]) -> None:
    # binary_data_output: every output without its own flag; an output's own false wins
    request = {"inputs": [{"name": "input", "shape": [N, D], "datatype": "FP32", "data": ROWS}],
               "outputs": [{"name": "predictions"}, {"name": "logits", "parameters": {"binary_data": False}}],
               "parameters": {"binary_data_output": True}}
    r = client.post(INFER, json=request)
    head, blobs = _split(r)
    assert list(blobs) == ["predictions"]
    assert _bytes_elements(blobs["predictions"]) == predicted["predictions"]
    assert head["outputs"][1]["data"] == pytest.approx(np.array(predicted["outputs"]).reshape(-1).tolist())
    # binary inputs, no binary output asked for: a plain JSON answer, no header
    body, headers = _framed({"inputs": [_tensor(X)]}, X.tobytes())
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert HEADER not in r.headers
    outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
    assert outputs["predictions"] == predicted["predictions"]
    # per-feature tensors, one binary and the others JSON, in another order
    tensors = [({"name": n, "shape": [N], "datatype": "FP32", "data": X[:, j].tolist()} if j else
                _tensor(np.ascontiguousarray(X[:, j]), n)) for j, n in reversed(list(enumerate(FEATURES)))]
    body, headers = _framed({"inputs": tensors}, np.ascontiguousarray(X[:, 0]).tobytes())
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert {o["name"]: o["data"] for o in r.json()["outputs"]}["predictions"] == predicted["predictions"]


def test_content_types_of_v2_and_the_other_routes(client: httpx.Client) -> None:
    """v2 infer takes JSON with no Content-Type (Triton's client sends none); the rest stays strict."""
    body = json.dumps({"inputs": [{"name": "input", "shape": [N, D], "datatype": "FP32", "data": ROWS}]})
    bare = httpx.Request("POST", f"{client.base_url}{INFER}", content=body.encode())
    assert "content-type" not in bare.headers
    r = client.send(bare)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    assert client.post(INFER, content=body, headers=OCTET).status_code == 200
    assert client.post(INFER, content=body, headers={"Content-Type": "application/json; charset=utf-8"}
                       ).status_code == 200
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "text/xml"):
        r = client.post(INFER, content=body, headers={"Content-Type": content_type})
        assert "Content-Type must be application/json (or application/octet-stream" in _error(r, 415)
    r = client.send(httpx.Request("POST", f"{client.base_url}/predict", content=json.dumps({"inputs": ROWS})))
    assert _error(r, 415) == "Content-Type must be application/json; got none"
    r = client.post(INFER, content=body, headers={"Content-Type": "application/json",
                                                  "Content-Encoding": "gzip"})
    assert "Content-Encoding 'gzip' is not supported" in _error(r, 415)


# ---- bad framing --------------------------------------------------------------------------------------
def _bad_cases() -> list[tuple[str, bytes, dict[str, str], int, str]]:
    raw = X.tobytes()
    ok_body, ok_headers = _framed({"inputs": [_tensor(X)]}, raw)
    head_len = int(ok_headers[HEADER])
    with_data = {"inputs": [{**_tensor(X), "data": ROWS}]}
    nan, inf = X.copy(), X.copy()
    nan[1, 2], inf[3, 0] = np.nan, -np.inf
    return [
        ("header not a number", ok_body, {**OCTET, HEADER: "abc"}, 400,
         f"{HEADER} header: must be a non-negative integer"),
        ("negative header", ok_body, {**OCTET, HEADER: "-5"}, 400,
         f"{HEADER} header: must be a non-negative"),
        ("header past the body", ok_body, {**OCTET, HEADER: str(len(ok_body) + 1)}, 400,
         f"{HEADER} header: {len(ok_body) + 1} bytes, longer than the whole body ({len(ok_body)} bytes)"),
        ("header cuts the JSON", ok_body, {**OCTET, HEADER: str(head_len - 3)}, 400,
         f"JSON inference header (the first {head_len - 3} bytes, {HEADER}) is not valid JSON"),
        ("header zero", ok_body, {**OCTET, HEADER: "0"}, 400, "JSON inference header (the first 0 bytes"),
        ("binary without the header", ok_body, OCTET, 400,
         f"request body is not valid JSON: Invalid JSON: trailing characters at line 1 column {head_len + 1} "
         f"(binary tensor data needs the {HEADER} header"),
        ("declared binary, no header, no bytes", ok_body[:head_len], OCTET, 400,
         f"inputs[0].parameters.binary_data_size: binary tensor data needs the {HEADER} header"),
        ("fewer bytes than declared", *_framed({"inputs": [_tensor(X)]}, raw[:-4]), 400,
         f"inputs[0].parameters.binary_data_size: the binary inputs declare {len(raw)} bytes in all, but "
         f"{len(raw) - 4} bytes follow"),
        ("more bytes than declared", *_framed({"inputs": [_tensor(X)]}, raw + b"\0" * 4), 400,
         f"declare {len(raw)} bytes in all, but {len(raw) + 4} bytes follow"),
        ("size not shape × 4", *_framed({"inputs": [{**_tensor(X), "shape": [N + 1, D]}]}, raw), 400,
         f"inputs[0].parameters.binary_data_size: {len(raw)} bytes, but shape [{N + 1}, {D}] of FP32 needs "
         f"{(N + 1) * D * 4}"),
        ("size not an integer", *_framed({"inputs": [_tensor(X, binary_data_size=True)]}, raw), 400,
         "inputs[0].parameters.binary_data_size: must be a non-negative integer, got True"),
        ("negative size", *_framed({"inputs": [_tensor(X, binary_data_size=-80)]}, raw), 400,
         "inputs[0].parameters.binary_data_size: must be a non-negative integer, got -80"),
        ("data and binary at once", *_framed(with_data, raw), 400,
         "inputs[0]: has both data and parameters.binary_data_size"),
        ("bytes after a JSON-only request", *_framed({"inputs": [{**_tensor(X), "parameters": None,
                                                                 "data": ROWS}]}, raw), 400,
         f"{HEADER} header: {len(raw)} bytes follow the JSON part, but no input has"),
        ("NaN", *_framed({"inputs": [_tensor(nan)]}, nan.tobytes()), 422,
         "inputs[0] (binary data)[6]: value is not a finite number"),
        ("-inf", *_framed({"inputs": [_tensor(inf)]}, inf.tobytes()), 422,
         "inputs[0] (binary data)[12]: value is not a finite number"),
        ("not FP32", *_framed({"inputs": [{**_tensor(X), "datatype": "FP64"}]}, raw), 422,
         "inputs[0].datatype: only FP32 is supported, got 'FP64'"),
        ("output flag not a boolean", *_framed({"inputs": [_tensor(X)], "outputs": [
            {"name": "logits", "parameters": {"binary_data": "yes"}}]}, raw), 422,
         "outputs[0].parameters.binary_data: must be true or false, got 'yes'"),
        ("request flag not a boolean", *_framed({"inputs": [_tensor(X)],
                                                 "parameters": {"binary_data_output": 1}}, raw), 422,
         "parameters.binary_data_output: must be true or false, got 1"),
        ("feature tensor of the wrong size", *_framed({"inputs": [
            _tensor(np.ascontiguousarray(X[:, j]), n) if j else
            {**_tensor(np.ascontiguousarray(X[:, j]), n), "shape": [N + 1]} for j, n in enumerate(FEATURES)]},
            raw), 400, f"inputs[0].parameters.binary_data_size: {N * 4} bytes, but shape [{N + 1}] of FP32"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_framing_is_a_4xx_naming_the_problem(client: httpx.Client, case: tuple) -> None:
    _name, body, headers, status, needle = case
    r = client.post(INFER, content=body, headers=headers)
    assert needle in _error(r, status)
    assert client.get("/v2/health/live").status_code == 200


def test_range_checks_count_binary_rows(client: httpx.Client) -> None:
    """Binary rows go through the same per-feature range check as JSON ones (served under warn)."""

    def out_of_range() -> float:
        metrics = client.get("/metrics").text
        m = re.search(r'^skqk_input_out_of_range_rows_total\{endpoint="v2"\} (\S+)$', metrics, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    before = out_of_range()
    far = X.copy()
    far[0, 2] = 1000.0  # bp beyond 200
    body, headers = _framed({"inputs": [_tensor(far)]}, far.tobytes())
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert out_of_range() == before + 1
