"""/predict and the Open Inference Protocol v2 endpoints."""

from __future__ import annotations

import math
import uuid
from importlib import metadata
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from app.api.errors import ApiError, FastJSONResponse, parse_body
from app.api.schemas import PredictRequest, V2InferRequest
from app.api.state import AppState, check_float32, get_state, rows_to_array
from app.serving.holder import LoadedModel
from app.storage import UnknownVersion

router = APIRouter()

OUTPUT_NAMES = ("logits", "predictions")


def _server_version() -> str:
    try:
        return metadata.version("skqk-serve")
    except metadata.PackageNotFoundError:
        return "0"


def _plain_rows(body: bytes, width: int) -> np.ndarray | None:
    """The common case, parsed cheaply: ``{"inputs": [[number × width], …]}`` → float32 rows.

    Anything unusual (bad JSON, NaN/Infinity, strings, booleans, wrong widths, float32
    overflow …) returns None and goes through the validating parser, which names the field.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    rows = obj.get("inputs") if type(obj) is dict else None
    if type(rows) is not list or not rows:
        return None
    for row in rows:
        if type(row) is not list or len(row) != width:
            return None
        for v in row:
            if type(v) is not float and type(v) is not int:
                return None
    with np.errstate(over="ignore"):  # float32 overflow → inf → the validating path reports it
        x = np.array(rows, dtype=np.float32)
    return x if np.isfinite(x).all() else None


async def predict_payload(st: AppState, body: bytes) -> dict[str, Any]:
    """POST /predict: the whole request → answer step (raises ApiError for client errors)."""
    loaded = st.require_model()
    x = _plain_rows(body, loaded.input_dim)
    if x is None:
        req = parse_body(PredictRequest, body)
        x = rows_to_array(req.inputs, loaded.input_dim, "inputs")
    result = await st.infer(x)
    return {"model_version": result.version, "predictions": result.predictions, "outputs": result.outputs}


@router.post("/predict")
async def predict(request: Request) -> Response:
    return FastJSONResponse(await predict_payload(get_state(request), await request.body()))


# ---- Open Inference Protocol v2 --------------------------------------------------------------
@router.get("/v2")
async def v2_server_metadata() -> Response:
    return FastJSONResponse({"name": "skqk-serve", "version": _server_version(), "extensions": []})


@router.get("/v2/health/live")
async def v2_live() -> Response:
    return FastJSONResponse({"live": True})


@router.get("/v2/health/ready")
async def v2_ready(request: Request) -> Response:
    if get_state(request).holder.ready:
        return FastJSONResponse({"ready": True})
    return FastJSONResponse({"ready": False, "error": "model not loaded yet"}, status_code=503,
                            headers={"Retry-After": "1"})


def _check_name(st: AppState, name: str) -> None:
    if name != st.settings.model_name:
        raise ApiError(404, f"unknown model {name!r}; this server serves {st.settings.model_name!r}")


def _parse_version(version: str) -> int:
    try:
        v = int(version)
    except ValueError:
        raise ApiError(404, f"model version {version!r} not found (versions are integers)") from None
    if v < 1:
        raise ApiError(404, f"model version {v} not found")
    return v


def _tensor_metadata(loaded: LoadedModel) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, loaded.input_dim]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, loaded.num_outputs]},
                        {"name": "predictions", "datatype": "INT64", "shape": [-1]}]}


@router.get("/v2/models/{name}")
async def v2_model_metadata(name: str, request: Request) -> Response:
    st = get_state(request)
    _check_name(st, name)
    loaded = st.require_model()
    versions = await run_in_threadpool(st.store.list_versions)
    return FastJSONResponse({"name": name, "versions": [str(v.version) for v in versions],
                             "platform": "pytorch", "active_version": str(loaded.version),
                             **_tensor_metadata(loaded)})


@router.get("/v2/models/{name}/ready")
async def v2_model_ready(name: str, request: Request) -> Response:
    st = get_state(request)
    _check_name(st, name)
    loaded = st.holder.current
    if loaded is None:
        return FastJSONResponse({"name": name, "ready": False, "error": "model not loaded yet"},
                                status_code=503, headers={"Retry-After": "1"})
    return FastJSONResponse({"name": name, "ready": True, "version": str(loaded.version)})


def _flatten(data: list[Any], where: str, out: list[float]) -> None:
    for i, v in enumerate(data):
        t = type(v)
        if t is float or t is int:
            out.append(v)
        elif t is list:
            _flatten(v, f"{where}[{i}]", out)
        else:
            raise ApiError(422, f"{where}[{i}]: expected a number, got {type(v).__name__}")


def _v2_input(req: V2InferRequest, loaded: LoadedModel) -> np.ndarray:
    if len(req.inputs) != 1:
        raise ApiError(422, f"inputs: exactly one input tensor expected, got {len(req.inputs)}")
    tensor = req.inputs[0]
    if tensor.datatype != "FP32":
        raise ApiError(422, f"inputs[0].datatype: only FP32 is supported, got {tensor.datatype!r}")
    shape = tensor.shape
    if not shape:
        raise ApiError(422, "inputs[0].shape: must not be empty")
    rows, width = (1, shape[0]) if len(shape) == 1 else (shape[0], math.prod(shape[1:]))
    if width != loaded.input_dim:
        raise ApiError(422, f"inputs[0].shape: {shape} has {width} features per row; "
                            f"the model takes {loaded.input_dim} (shape [N, {loaded.input_dim}])")
    if rows == 0:
        raise ApiError(422, "inputs[0].shape: needs at least one row")
    if all(type(v) is float or type(v) is int for v in tensor.data):
        flat = tensor.data
    else:
        flat = []
        _flatten(tensor.data, "inputs[0].data", flat)
    expected = math.prod(shape)
    if len(flat) != expected:
        raise ApiError(422, f"inputs[0].data: shape {shape} needs {expected} values, got {len(flat)}")
    x = np.asarray(flat, dtype=np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        raise ApiError(422, f"inputs[0].data[{int(np.argmax(bad))}]: value is not a finite number")
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    return check_float32(x32.reshape(rows, width), "inputs[0].data")


async def v2_infer_payload(st: AppState, body: bytes, name: str, version: str | None) -> dict[str, Any]:
    """POST /v2/models/{name}[/versions/{v}]/infer (raises ApiError for client errors)."""
    _check_name(st, name)
    req = parse_body(V2InferRequest, body)
    if version is None:
        loaded, target = st.require_model(), None
    else:
        v = _parse_version(version)
        try:
            loaded = await run_in_threadpool(st.holder.get_version, v)
        except UnknownVersion:
            raise ApiError(404, f"model {name!r} version {v} not found") from None
        target = loaded
    wanted = [o.name for o in req.outputs] if req.outputs else list(OUTPUT_NAMES)
    for i, out_name in enumerate(wanted):
        if out_name not in OUTPUT_NAMES:
            raise ApiError(422, f"outputs[{i}].name: unknown output {out_name!r}; have {list(OUTPUT_NAMES)}")
    x = _v2_input(req, loaded)
    result = await st.infer(x, target)
    n = x.shape[0]
    tensors = {"logits": {"name": "logits", "shape": [n, result.outputs.shape[1]], "datatype": "FP32",
                          "data": result.outputs.reshape(-1)},
               "predictions": {"name": "predictions", "shape": [n], "datatype": "INT64",
                               "data": result.predictions}}
    return {"model_name": name, "model_version": str(result.version),
            "id": req.id if req.id is not None else uuid.uuid4().hex,
            "outputs": [tensors[w] for w in wanted]}


@router.post("/v2/models/{name}/infer")
async def v2_infer(name: str, request: Request) -> Response:
    return FastJSONResponse(await v2_infer_payload(get_state(request), await request.body(), name, None))


@router.post("/v2/models/{name}/versions/{version}/infer")
async def v2_infer_version(name: str, version: str, request: Request) -> Response:
    return FastJSONResponse(await v2_infer_payload(get_state(request), await request.body(), name, version))
