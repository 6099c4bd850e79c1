"""Triton's own HTTP client (``tritonclient.http``) against a real ``skqk serve``.

That client sends JSON without a Content-Type and, by default, tensors as binary tensor data
(``Inference-Header-Content-Length``); both must work, with the inference fast path on and
with ``SKQK_FAST_PATH=false``, and answer exactly what ``/predict`` answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.helpers.server import ServerProcess
from tests.helpers.v2_model import CLASSES, FEATURES, ROWS, start_classifier_server

MODEL = "skqk"
OUTPUTS = ("logits", "predictions", "prediction_indices")
X = np.array(ROWS, dtype=np.float32)


@pytest.fixture(scope="module", params=["fast path", "FastAPI routes"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    fast = request.param == "fast path"
    server = start_classifier_server(tmp_path_factory.mktemp("triton"), fast_path=fast)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=60.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def predicted(server: ServerProcess) -> dict[str, Any]:
    r = httpx.post(f"{server.url}/predict", json={"inputs": ROWS}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _input(name: str, x: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def _check(result: triton.InferResult, predicted: dict[str, Any], names: tuple[str, ...] = OUTPUTS) -> None:
    if "logits" in names:
        logits = result.as_numpy("logits")
        assert logits.dtype == np.float32 and logits.shape == (len(ROWS), len(CLASSES))
        np.testing.assert_array_equal(logits, np.array(predicted["outputs"], dtype=np.float32))
    if "predictions" in names:  # BYTES: the class names
        labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("predictions").tolist()]
        assert labels == predicted["predictions"]
    if "prediction_indices" in names:
        indices = result.as_numpy("prediction_indices")
        assert indices.dtype == np.int64 and indices.tolist() == predicted["prediction_indices"]


def test_health_and_metadata_through_the_client(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("other")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(MODEL)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, len(FEATURES)]}]
    assert [o["name"] for o in meta["outputs"]] == list(OUTPUTS)
    assert meta["outputs"][1]["datatype"] == "BYTES"


def test_version_ready_and_metadata_through_the_client(client: triton.InferenceServerClient,
                                                      server: ServerProcess) -> None:
    assert client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "999") and not client.is_model_ready(MODEL, "x")
    meta = client.get_model_metadata(MODEL, "1")
    assert meta["versions"] == ["1"] and meta["active_version"] == "1"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, len(FEATURES)]}]
    missing = httpx.get(f"{server.url}/v2/models/{MODEL}/versions/999", timeout=30)
    assert missing.status_code == 404 and "version 999" in missing.json()["error"]


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True, None], ids=["json-out", "binary-out", "default-out"])
def test_infer_json_and_binary_tensors_answer_like_predict(
        client: triton.InferenceServerClient, predicted: dict[str, Any], binary_in: bool,
        binary_out: bool | None) -> None:
    # None: no outputs named, so the client asks for all of them as binary (binary_data_output)
    outputs = None if binary_out is None else [triton.InferRequestedOutput(n, binary_data=binary_out)
                                               for n in OUTPUTS]
    result = client.infer(MODEL, [_input("input", X, binary_in)], outputs=outputs, request_id="r-1")
    response = result.get_response()
    assert response["model_name"] == MODEL and response["model_version"] == "1" and response["id"] == "r-1"
    for out in response["outputs"]:
        assert ("data" in out) is (binary_out is False), out
    _check(result, predicted)


def test_mixed_outputs_pinned_version_and_feature_tensors(
        client: triton.InferenceServerClient, predicted: dict[str, Any]) -> None:
    # one binary output, one JSON output, on an explicit version
    outputs = [triton.InferRequestedOutput("predictions", binary_data=True),
               triton.InferRequestedOutput("logits", binary_data=False)]
    result = client.infer(MODEL, [_input("input", X, True)], model_version="1", outputs=outputs)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["predictions", "logits"]
    _check(result, predicted, ("predictions", "logits"))
    # one [N] tensor per feature, named by feature, in another order, binary and JSON mixed
    order = list(reversed(range(len(FEATURES))))
    columns = [(FEATURES[j], np.ascontiguousarray(X[:, j])) for j in order]
    _check(client.infer(MODEL, [_input(n, col, binary=k % 2 == 0) for k, (n, col) in enumerate(columns)]),
           predicted)
    _check(client.infer(MODEL, [_input(n, col, binary=True) for n, col in columns]), predicted)


def test_client_sees_the_errors(client: triton.InferenceServerClient, server: ServerProcess) -> None:
    cases = [
        (lambda: client.infer(MODEL, [_input("input", X[:, :3].copy(), True)]), "422",
         "inputs[0].shape: [5, 3] has 3 features per row; the model takes 4"),
        (lambda: client.infer("other", [_input("input", X, True)]), "404", "unknown model 'other'"),
        (lambda: client.infer(MODEL, [_input("input", X, True)], model_version="99"), "404",
         "version 99 not found"),
        (lambda: client.infer(MODEL, [_input("input", X, True)],
                              outputs=[triton.InferRequestedOutput("logits", class_count=2)]), "422",
         "outputs[0].parameters.classification: the classification extension is not supported"),
    ]
    for call, status, needle in cases:
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == status and needle in caught.value.message(), caught.value
    nan = X.copy()
    nan[2, 1] = np.nan
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [_input("input", nan, True)])
    assert caught.value.status() == "422" and "not a finite number" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:  # JSON NaN: the client sends the token NaN
        client.infer(MODEL, [_input("input", nan, False)])
    assert caught.value.status() == "422" and "inputs[0].data[9]" in caught.value.message()
    assert client.is_server_ready() and server.proc is not None and server.proc.poll() is None
