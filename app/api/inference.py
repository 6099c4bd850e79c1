"""/predict and the Open Inference Protocol v2 endpoints."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from importlib import metadata
from typing import Any

import msgspec
import numpy as np
from fastapi import APIRouter, Depends, Request
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from app.api.errors import ApiError, FastJSONResponse, parse_body
from app.api.rows import parse_rows, schema_error, values_to_float32
from app.api.schemas import PredictRequest, V2InferRequest, V2Tensor
from app.api.state import AppState, check_float32, get_state, require_predict_key, store_unavailable
from app.api.table_rows import parse_table_rows
from app.api.v2_binary import (
    BinaryAnswer,
    binary_outputs,
    encode_answer,
    fp32_bytes,
    fp32_values,
    header_length,
    input_bytes,
    int64_bytes,
    json_part_name,
    missing_header_hint,
    names_bytes,
    split_body,
)
from app.api.v2_table import input_metadata, tensors_by_name, v2_table_rows
from app.core.features import FeatureSchema, SchemaError
from app.serving.batcher import Float32Overflow, InferenceResult
from app.serving.holder import LoadedModel
from app.storage import UnknownVersion

router = APIRouter()


def _server_version() -> str:
    try:
        return metadata.version("skqk-serve")
    except metadata.PackageNotFoundError:
        return "0"


class _PlainRows(msgspec.Struct):
    inputs: list[list[float]]


_decode_plain = msgspec.json.Decoder(_PlainRows).decode  # typed, in C: no per-value Python loop


def _plain_rows(body: bytes, width: int) -> np.ndarray | None:
    """The common case, parsed cheaply: ``{"inputs": [[number × width], …]}`` → float64 rows.

    Anything unusual (more keys than ``inputs``, bad JSON, NaN/Infinity, strings, booleans,
    nulls, wrong widths …) returns None and goes through the validating parser, which names
    the field. Exactly one colon means ``inputs`` is the only key, so no key can be duplicated
    (the parser would keep the last silently). float32 overflow is left to the batcher, which
    converts the whole batch at once (``Float32Overflow``: see ``predict_payload``).
    """
    if body.count(b":") != 1:
        return None
    try:
        rows = _decode_plain(body).inputs
    except msgspec.DecodeError:
        return None
    if not rows:
        return None
    for row in rows:
        if len(row) != width:
            return None
    return np.array(rows)  # float64 holds any number the decoder accepts


def _validated_rows(body: bytes, loaded: LoadedModel, st: AppState | None = None) -> np.ndarray:
    """The validating way: named rows, and a 4xx naming the field for anything wrong."""
    req = parse_body(PredictRequest, body)
    if loaded.schema.encoding is not None:  # raw table rows: text, booleans, nulls
        rows = parse_table_rows(req.inputs, loaded.schema, _input_row, "inputs")
        if st is not None:
            st.check_unknown(rows, "predict", _input_row)
        return rows.x
    return parse_rows(req.inputs, loaded.schema, _input_row, "inputs")


def _input_row(i: int) -> str:
    return f"inputs[{i}]"


def predict_body(schema: FeatureSchema, result: InferenceResult) -> dict[str, Any]:
    """The /predict answer: class names (or ints) + indices + logits, or regression values."""
    out = result.outputs
    if schema.is_regression:  # outputs are already in target units
        values = np.ascontiguousarray(out[:, 0]) if out.shape[1] == 1 else out
        return {"model_version": result.version, "predictions": values, "outputs": out}
    idx = result.predictions
    labels = idx if schema.class_names is None else schema.class_labels(idx)
    return {"model_version": result.version, "predictions": labels, "prediction_indices": idx,
            "outputs": out}


def check_finite_outputs(result: InferenceResult, where: Callable[[int], str]) -> None:
    """Finite inputs can still drive a net to inf/NaN (e.g. 3e38 everywhere); never a success."""
    if result.finite:  # the batcher checked the whole batch at once
        return
    bad = ~np.isfinite(result.outputs)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ApiError(422, f"{where(row)}: the model's output is not finite for this row (its values are "
                            "far outside what the model handles)")


async def predict_payload(st: AppState, body: bytes) -> dict[str, Any]:
    """POST /predict: the whole request → answer step (raises ApiError for client errors)."""
    loaded = st.require_model()
    # the cheap parse is for plain numeric models only: encoded ones take raw table rows
    x = _plain_rows(body, loaded.input_dim) if loaded.schema.encoding is None else None
    if x is None:  # named rows, or something to report
        x = _validated_rows(body, loaded, st)
    st.check_ranges(loaded.schema, x, "predict", _input_row, refuse=False)
    # pinned to the version the rows were checked against (its feature order, its classes)
    try:
        result = await st.infer(x, loaded)
    except Float32Overflow:  # the plain parse left this check to the batch: name the value
        result = await st.infer(_validated_rows(body, loaded), loaded)
    check_finite_outputs(result, _input_row)
    return predict_body(loaded.schema, result)


@router.post("/predict", dependencies=[Depends(require_predict_key)])
async def predict(request: Request) -> Response:
    return FastJSONResponse(await predict_payload(get_state(request), await request.body()))


# ---- Open Inference Protocol v2 --------------------------------------------------------------
@router.get("/v2")
async def v2_server_metadata() -> Response:
    return FastJSONResponse({"name": "skqk-serve", "version": _server_version(),
                             "extensions": ["binary_tensor_data", "explain"]})


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


MAX_VERSION = 2**31 - 1


def _parse_version(version: str) -> int:
    try:
        v = int(version)
    except ValueError:
        raise ApiError(404, f"model version {version!r} not found (versions are integers)") from None
    if not 1 <= v <= MAX_VERSION:  # beyond the store's integer column: cannot exist
        raise ApiError(404, f"model version {v} not found")
    return v


def output_names(schema: FeatureSchema) -> tuple[str, ...]:
    return ("predictions",) if schema.is_regression else ("logits", "predictions", "prediction_indices")


def _output_metadata(schema: FeatureSchema) -> list[dict[str, Any]]:
    if schema.is_regression:
        return [{"name": "predictions", "datatype": "FP32", "shape": [-1, schema.num_outputs]}]
    return [{"name": "logits", "datatype": "FP32", "shape": [-1, schema.num_outputs]},
            {"name": "predictions", "datatype": "BYTES" if schema.class_names else "INT64", "shape": [-1]},
            {"name": "prediction_indices", "datatype": "INT64", "shape": [-1]}]


def _model_parameters(schema: FeatureSchema) -> dict[str, Any]:
    """What the tensors mean: feature names (also the names of per-feature input tensors)."""
    params: dict[str, Any] = {"feature_names": list(schema.feature_names), "task": schema.task}
    if schema.encoding is not None:  # the columns clients send, with their types and vocabularies
        params["columns"] = schema.encoding.to_list()
    if schema.is_regression:
        params["target_names"] = list(schema.target_names)
    else:
        params["class_names"] = list(schema.class_names) if schema.class_names is not None else None
    return params


def _tensor_metadata(loaded: LoadedModel) -> dict[str, Any]:
    schema = loaded.schema
    inputs = (input_metadata(schema) if schema.encoding is not None else
              [{"name": "input", "datatype": "FP32", "shape": [-1, *schema.input_shape]}])
    return {"inputs": inputs,
            "outputs": _output_metadata(schema), "parameters": _model_parameters(schema)}


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


async def _loaded_version(st: AppState, name: str, version: str) -> LoadedModel:
    """A stored version, loaded (or from the holder's cache): 404 unknown, 503 store down."""
    v = _parse_version(version)
    try:
        return await run_in_threadpool(st.holder.get_version, v)
    except UnknownVersion:
        raise ApiError(404, f"model {name!r} version {v} not found") from None
    except DBAPIError as exc:  # a version not cached needs the store
        raise store_unavailable(exc) from None


@router.get("/v2/models/{name}/versions/{version}")
async def v2_version_metadata(name: str, version: str, request: Request) -> Response:
    st = get_state(request)
    _check_name(st, name)
    loaded = await _loaded_version(st, name, version)
    active = st.holder.current
    return FastJSONResponse({"name": name, "versions": [str(loaded.version)], "platform": "pytorch",
                             "active_version": str(active.version) if active else None,
                             **_tensor_metadata(loaded)})


@router.get("/v2/models/{name}/versions/{version}/ready")
async def v2_version_ready(name: str, version: str, request: Request) -> Response:
    """Ready = this replica can answer ``/versions/{version}/infer`` (the version loads)."""
    st = get_state(request)
    _check_name(st, name)
    try:
        loaded = await _loaded_version(st, name, version)
    except ApiError as exc:
        if exc.status != 503:
            raise
        return FastJSONResponse({"name": name, "ready": False, "version": version, "error": exc.message},
                                status_code=503, headers={"Retry-After": "1"})
    except Exception as exc:  # stored but unloadable (bad weights): not ready, never a 500
        return FastJSONResponse({"name": name, "ready": False, "version": version,
                                 "error": f"version failed to load ({type(exc).__name__})"},
                                status_code=503)
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


Raw = list[memoryview | None]  # per input: its binary tensor data, or None (JSON ``data``)


def _v2_input(req: V2InferRequest, loaded: LoadedModel, raw: Raw) -> np.ndarray:
    """One ``input`` tensor ([N, D], [N, *input_shape]), or one tensor per feature name."""
    tensors, schema = req.inputs, loaded.schema
    if not tensors:
        raise ApiError(422, "inputs: exactly one input tensor expected, got 0 "
                            "(or one [N] tensor per feature, named by feature)")
    if len(tensors) == 1 and tensors[0].name not in schema.feature_names:
        return _whole_input(tensors[0], loaded, raw[0])
    return _feature_tensors(tensors, schema, raw)


_NUMBER_TYPES = {float, int}  # exact types: bool must not pass


def _check_fp32(tensor: V2Tensor, i: int) -> None:
    if tensor.datatype != "FP32":
        raise ApiError(422, f"inputs[{i}].datatype: only FP32 is supported, got {tensor.datatype!r}")


def _flat_data(tensor: V2Tensor, i: int, expected: int) -> list[Any]:
    data = tensor.data
    if data is None:
        raise ApiError(422, f"inputs[{i}].data: Field required (or binary tensor data: "
                            "parameters.binary_data_size)")
    if set(map(type, data)) <= _NUMBER_TYPES:  # one C-level pass: the flat list of numbers
        flat = data
    else:
        flat = []
        _flatten(data, f"inputs[{i}].data", flat)
    if len(flat) != expected:
        raise ApiError(422, f"inputs[{i}].data: shape {tensor.shape} needs {expected} values, "
                            f"got {len(flat)}")
    return flat


def _whole_input(tensor: V2Tensor, loaded: LoadedModel, raw: memoryview | None) -> np.ndarray:
    _check_fp32(tensor, 0)
    shape = tensor.shape
    if not shape:
        raise ApiError(422, "inputs[0].shape: must not be empty")
    rows, width = (1, shape[0]) if len(shape) == 1 else (shape[0], math.prod(shape[1:]))
    if width != loaded.input_dim:
        dim, full = loaded.input_dim, list(loaded.schema.input_shape)
        alt = f" or [N, {', '.join(map(str, full))}]" if len(full) > 1 else ""
        raise ApiError(422, f"inputs[0].shape: {shape} has {width} features per row; "
                            f"the model takes {dim} (shape [N, {dim}]{alt}, or one tensor per feature)")
    if rows == 0:
        raise ApiError(422, "inputs[0].shape: needs at least one row")
    if raw is not None:  # binary: already float32, only NaN/inf to refuse
        return fp32_values(raw, tensor, 0).reshape(rows, width)
    try:
        x = np.asarray(_flat_data(tensor, 0, math.prod(shape)), dtype=np.float64)
    except OverflowError:  # an integer beyond float64 (e.g. 400 digits): a client error
        raise ApiError(422, "inputs[0].data: a value is out of float32 range") from None
    bad = ~np.isfinite(x)
    if bad.any():
        raise ApiError(422, f"inputs[0].data[{int(np.argmax(bad))}]: value is not a finite number")
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    return check_float32(x32.reshape(rows, width), "inputs[0].data")


def _feature_column(tensor: V2Tensor, i: int, raw: memoryview | None) -> list[Any] | np.ndarray:
    """A per-feature tensor, shape [N] or [N, 1] → its N values (float32 when binary)."""
    _check_fp32(tensor, i)
    shape = tensor.shape
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] == 0:
        raise ApiError(422, f"inputs[{i}].shape: feature tensor {tensor.name!r} must have shape [N] or "
                            f"[N, 1] with N >= 1, got {shape}")
    return _flat_data(tensor, i, shape[0]) if raw is None else fp32_values(raw, tensor, i)


def _feature_tensors(tensors: list[V2Tensor], schema: FeatureSchema, raw: Raw) -> np.ndarray:
    """Named features: one tensor per feature name, all with the same number of rows."""
    by_name = tensors_by_name(tensors)
    try:
        order: list[int] = schema.row_from_object(by_name, "inputs")
    except SchemaError as exc:
        raise schema_error(exc) from None
    columns = [_feature_column(tensors[i], i, raw[i]) for i in order]
    n = len(columns[0])
    for i, col in zip(order, columns, strict=True):
        if len(col) != n:
            raise ApiError(422, f"inputs[{i}].shape: {len(col)} rows, but inputs[{order[0]}] has {n}")
    if all(type(col) is np.ndarray for col in columns):  # all binary: checked already
        return np.column_stack(columns)
    columns = [col.tolist() if type(col) is np.ndarray else col for col in columns]
    rows = [list(r) for r in zip(*columns, strict=True)]
    return values_to_float32(rows, lambda r, c: f"inputs[{order[c]}].data[{r}]")


def _v2_row(i: int) -> str:
    return f"inputs (row {i})"


def _v2_output(schema: FeatureSchema, result: InferenceResult, name: str,
               binary: bool) -> tuple[dict[str, Any], bytes | None]:
    """One answered output: its JSON entry, and its bytes when it goes as binary tensor data."""
    out, idx = result.outputs, result.predictions
    n = out.shape[0]
    if name == "logits" or schema.is_regression:  # regression: "predictions" are the outputs
        entry: dict[str, Any] = {"name": name, "shape": [n, out.shape[1]], "datatype": "FP32"}
        values: Any = out.reshape(-1)
        blob = fp32_bytes(values) if binary else None
    elif name == "prediction_indices" or schema.class_names is None:
        entry = {"name": name, "shape": [n], "datatype": "INT64"}
        values = idx
        blob = int64_bytes(idx) if binary else None
    else:
        entry = {"name": name, "shape": [n], "datatype": "BYTES"}
        values = None if binary else schema.class_labels(idx)
        blob = names_bytes(schema.class_names, idx) if binary else None
    if blob is None:
        entry["data"] = values
    else:
        entry["parameters"] = {"binary_data_size": len(blob)}
    return entry, blob


async def v2_infer_payload(st: AppState, body: bytes, name: str, version: str | None,
                           header: str | bytes | None = None) -> dict[str, Any] | BinaryAnswer:
    """POST /v2/models/{name}[/versions/{v}]/infer (raises ApiError for client errors).

    ``header``: the Inference-Header-Content-Length value, if sent (binary tensor data).
    """
    _check_name(st, name)
    length = header_length(header, len(body))
    head, rest = split_body(body, length)
    try:
        req = parse_body(V2InferRequest, head, json_part_name(length))
    except ApiError as exc:
        raise missing_header_hint(exc, body, length) from None
    raw = input_bytes(req, rest, length)
    if version is None:
        loaded = st.require_model()
    else:
        loaded = await _loaded_version(st, name, version)
    names = output_names(loaded.schema)
    wanted = [o.name for o in req.outputs] if req.outputs else list(names)
    for i, out_name in enumerate(wanted):
        if out_name not in names:
            raise ApiError(422, f"outputs[{i}].name: unknown output {out_name!r}; have {list(names)}")
    binary = binary_outputs(req, len(wanted))
    if loaded.schema.encoding is not None:  # one tensor per column, text as BYTES
        rows = v2_table_rows(req.inputs, loaded.schema, raw)
        st.check_unknown(rows, "v2", _v2_row)
        x = rows.x
    else:
        x = _v2_input(req, loaded, raw)
    st.check_ranges(loaded.schema, x, "v2", _v2_row, refuse=False)
    result = await st.infer(x, loaded)  # pinned: the schema that parsed the rows formats the answer
    check_finite_outputs(result, lambda r: f"inputs (row {r})")
    answer = {"model_name": name, "model_version": str(result.version),
              "id": req.id if req.id is not None else uuid.uuid4().hex}
    if not any(binary):  # all JSON: the usual answer
        answer["outputs"] = [_v2_output(loaded.schema, result, w, False)[0] for w in wanted]
        return answer
    answered = [_v2_output(loaded.schema, result, w, b) for w, b in zip(wanted, binary, strict=True)]
    answer["outputs"] = [entry for entry, _ in answered]
    return BinaryAnswer(answer, [blob for _, blob in answered if blob is not None])


async def _v2_response(request: Request, name: str, version: str | None) -> Response:
    payload = await v2_infer_payload(get_state(request), await request.body(), name, version,
                                     request.headers.get("inference-header-content-length"))
    body, headers = encode_answer(payload)
    response = Response(body, media_type=headers[0][1].decode())  # Content-Length, then the type
    response.raw_headers.extend(headers[1:])  # Inference-Header-Content-Length, when binary
    return response


@router.post("/v2/models/{name}/infer", dependencies=[Depends(require_predict_key)])
async def v2_infer(name: str, request: Request) -> Response:
    return await _v2_response(request, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer",
             dependencies=[Depends(require_predict_key)])
async def v2_infer_version(name: str, version: str, request: Request) -> Response:
    return await _v2_response(request, name, version)
