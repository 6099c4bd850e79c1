"""``POST /explain``, the v2 explain extension and KServe v1 ``POST /v1/models/{name}:explain``.

Each request takes the version it explains once (the active one, or the one its path names),
so a hot swap never mixes versions in an answer. The maths is ``app.core.explain``: exact
contributions ``A_j(x)·(x_j − r_j)``, the intercept ``A(x)·r + c(x)``, the certified radius.
Work runs on one explanation thread per process (explanations cost ~D forward passes per row;
one at a time keeps ``/predict``'s batcher responsive) and is capped per request by
``SKQK_EXPLAIN_MAX_ELEMENTS`` (413): rows × inputs × (widest layer + gated units) is what the
Jacobians occupy, so the cap bounds a request's time; memory is bounded by chunking.
"""

from __future__ import annotations

import asyncio
import math
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from app.api.errors import ApiError, FastJSONResponse, parse_body
from app.api.explain_schemas import ExplainRequest, KServeExplainRequest
from app.api.inference import _check_name, _loaded_version, _v2_input
from app.api.rows import json_kind, parse_rows
from app.api.schemas import V2InferRequest
from app.api.state import AppState, get_state, require_predict_key
from app.api.table_rows import parse_table_rows
from app.api.v2_table import v2_table_rows
from app.core.explain import cost_per_row
from app.core.features import FeatureSchema
from app.serving.explaining import Explained, ExplainInputError, compute, named_reference, resolve_outputs
from app.serving.holder import LoadedModel

router = APIRouter()

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()



def client_rows(st: AppState, loaded: LoadedModel, rows: Any, where: Any, field: str) -> np.ndarray:
    """Rows as /predict takes them → the network's input; a table's raw rows (text, booleans,
    nulls) go through its encoding, unknown categories as ``SKQK_UNKNOWN_CATEGORY`` says."""
    if loaded.schema.encoding is None:
        return parse_rows(rows, loaded.schema, where, field)
    parsed = parse_table_rows(rows, loaded.schema, where, field)
    st.check_unknown(parsed, "explain", where)
    return parsed.x

def _pool(threads: int) -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="skqk-explain",
                                           initializer=torch.set_num_threads, initargs=(threads,))
        return _executor


def resolve_reference(value: Any, loaded: LoadedModel, field: str) -> tuple[np.ndarray, str]:
    """(r float64 [D], its source) for ``"mean"`` (default), ``"zero"`` or one client row."""
    if value is None:
        value = "mean"
    if isinstance(value, str):
        return named_reference(value, loaded.schema, loaded.spec, field)
    if type(value) not in (list, dict):
        raise ApiError(422, f'{field}: expected "mean", "zero" or a row, got {json_kind(value)}')
    if loaded.schema.encoding is not None:  # a raw table row, encoded like the inputs
        row = parse_table_rows([value], loaded.schema, lambda _i: field, field).x
    else:
        row = parse_rows([value], loaded.schema, lambda _i: field, field)
    return row[0].astype(np.float64), "client"


def check_size(st: AppState, loaded: LoadedModel, rows: int, field: str) -> None:
    per_row = cost_per_row(loaded.spec)
    cap = st.settings.explain_max_elements
    if rows * per_row <= cap:
        return
    fits = cap // per_row
    advice = (f"send at most {fits} rows per request" if fits else
              "this model's explanation of one row is over it; raise SKQK_EXPLAIN_MAX_ELEMENTS")
    raise ApiError(413, f"{field}: {rows} rows × {per_row:,} Jacobian values per row (inputs × (widest "
                        f"layer + gated units)) = {rows * per_row:,} exceeds SKQK_EXPLAIN_MAX_ELEMENTS="
                        f"{cap:,}; {advice}")


async def explain_rows(st: AppState, loaded: LoadedModel, x: np.ndarray, reference: Any, outputs: Any,
                       field: str = "inputs", options: str = "", radius: bool = True) -> Explained:
    """Checks (size, reference, outputs, ranges) on the loop, then the maths on the explanation thread."""
    check_size(st, loaded, x.shape[0], field)
    try:
        ref, source = resolve_reference(reference, loaded, f"{options}reference")
        which = resolve_outputs(outputs, loaded.schema, f"{options}outputs")
    except ExplainInputError as exc:
        raise ApiError(422, str(exc)) from None
    st.check_ranges(loaded.schema, x, "explain", lambda r: f"{field}[{r}]", refuse=False)
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(_pool(st.settings.torch_threads), compute, loaded.model,
                                        loaded.schema, loaded.version, x, ref, source, which, radius)
    bad = ~np.isfinite(result.outputs).all(1)
    if bad.any():
        raise ApiError(422, f"{field}[{int(np.argmax(bad))}]: the model's output is not finite for this row "
                            "(its values are far outside what the model handles)")
    return result


# ---- answers --------------------------------------------------------------------------------------
def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _output_names(schema: FeatureSchema) -> list[Any]:
    if schema.is_regression:
        return list(schema.target_names)
    return schema.class_labels(np.arange(schema.num_outputs))


def row_explanations(e: Explained) -> tuple[list[Any], list[dict[str, Any]]]:
    """(predictions, one explanation object per row) — the /explain and KServe rows."""
    schema, names = e.schema, e.names
    out_names = _output_names(schema)
    outputs, chosen = e.outputs.tolist(), e.chosen.tolist()
    contrib, intercept = e.contributions.tolist(), e.intercept.tolist()
    r2, rinf, active = e.radius_l2.tolist(), e.radius_linf.tolist(), e.active_units.tolist()
    if schema.is_regression:
        predictions: list[Any] = [o[0] if len(o) == 1 else o for o in outputs]
    else:
        predictions = schema.class_labels(e.predictions)
    rows = []
    for i, pred in enumerate(predictions):
        explained = [{"output": out_names[c], "value": outputs[i][c], "intercept": intercept[i][j],
                      "contributions": dict(zip(names, contrib[i][j], strict=True))}
                     for j, c in enumerate(chosen[i])]
        row: dict[str, Any] = {"prediction": pred}
        if not schema.is_regression:
            row["prediction_index"] = int(e.predictions[i])
        row.update(outputs=explained, active_units=active[i], total_units=e.total_units,
                   certified_radius={"l2": _finite(r2[i]), "linf": _finite(rinf[i])})
        rows.append(row)
    return predictions, rows


def _reference_body(e: Explained) -> dict[str, Any]:
    return {"source": e.reference_source, "values": dict(zip(e.schema.feature_names, e.reference.tolist(),
                                                             strict=True))}


def explain_body(e: Explained) -> dict[str, Any]:
    _, rows = row_explanations(e)
    return {"model_version": e.version, "reference": _reference_body(e), "explanations": rows}


@router.post("/explain", dependencies=[Depends(require_predict_key)])
async def explain(request: Request) -> Response:
    st = get_state(request)
    req = parse_body(ExplainRequest, await request.body())
    loaded = st.require_model()  # pinned: this version parses, explains and formats the answer
    x = client_rows(st, loaded, req.inputs, lambda i: f"inputs[{i}]", "inputs")
    e = await explain_rows(st, loaded, x, req.reference, req.outputs, radius=req.radius)
    return FastJSONResponse(explain_body(e))


# ---- KServe v1 ------------------------------------------------------------------------------------
@router.post("/v1/models/{name}:explain", dependencies=[Depends(require_predict_key)])
async def kserve_explain(name: str, request: Request) -> Response:
    """KServe's v1 verb: ``{"instances": [...]}`` → ``{"predictions": [...], "explanations": [...]}``."""
    st = get_state(request)
    _check_name(st, name)
    req = parse_body(KServeExplainRequest, await request.body())
    if (req.instances is None) == (req.inputs is None):
        raise ApiError(422, "instances: give the rows as instances (or inputs), exactly one of the two")
    field = "instances" if req.instances is not None else "inputs"
    rows = req.instances if req.instances is not None else req.inputs
    loaded = st.require_model()
    x = client_rows(st, loaded, rows or [], lambda i: f"{field}[{i}]", field)
    e = await explain_rows(st, loaded, x, req.reference, req.outputs, field, radius=req.radius)
    predictions, explanations = row_explanations(e)
    return FastJSONResponse({"predictions": predictions, "explanations": explanations,
                             "model_version": e.version})


# ---- Open Inference Protocol v2: the explain extension --------------------------------------------
def _tensor(name: str, values: np.ndarray | list[Any], datatype: str) -> dict[str, Any]:
    arr = np.asarray(values)
    data: Any = arr.reshape(-1).tolist()
    if datatype == "FP32":
        data = [_finite(v) for v in data]
    return {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": data}


def v2_explain_body(e: Explained, name: str, request_id: str | None) -> dict[str, Any]:
    schema = e.schema
    labels = _output_names(schema)
    label_type = "BYTES" if (schema.is_regression or schema.class_names is not None) else "INT64"
    explained = np.asarray([[labels[c] for c in row] for row in e.chosen.tolist()])
    outputs = [_tensor("output_values", e.output_values(), "FP32"),
               _tensor("explained_outputs", explained, label_type),
               _tensor("contributions", e.contributions, "FP32"),
               _tensor("intercept", e.intercept, "FP32"),
               _tensor("active_units", e.active_units, "INT64"),
               _tensor("radius_l2", e.radius_l2, "FP32"),
               _tensor("radius_linf", e.radius_linf, "FP32")]
    if not schema.is_regression:
        outputs.insert(0, _tensor("predictions", np.asarray(schema.class_labels(e.predictions)),
                                  "BYTES" if schema.class_names else "INT64"))
    return {"model_name": name, "model_version": str(e.version),
            "id": request_id if request_id is not None else uuid.uuid4().hex,
            "parameters": {"feature_names": e.names, "total_units": e.total_units,
                           "reference": _reference_body(e)},
            "outputs": outputs}


async def _v2_explain(request: Request, name: str, version: str | None) -> Response:
    st = get_state(request)
    _check_name(st, name)
    req = parse_body(V2InferRequest, await request.body())
    loaded = st.require_model() if version is None else await _loaded_version(st, name, version)
    if any(t.parameters and "binary_data_size" in t.parameters for t in req.inputs):
        raise ApiError(422, "inputs: the explain extension takes JSON tensor data only")
    if loaded.schema.encoding is not None:  # one tensor per column, text as BYTES
        rows = v2_table_rows(req.inputs, loaded.schema, [None] * len(req.inputs))
        st.check_unknown(rows, "v2", lambda r: f"inputs (row {r})")
        x = rows.x
    else:
        x = _v2_input(req, loaded, [None] * len(req.inputs))
    params = req.parameters or {}
    radius = params.get("radius", True)
    if type(radius) is not bool:
        raise ApiError(422, f"parameters.radius: expected true or false, got {json_kind(radius)}")
    e = await explain_rows(st, loaded, x, params.get("reference"), params.get("outputs"),
                           options="parameters.", radius=radius)
    return FastJSONResponse(v2_explain_body(e, name, req.id))


@router.post("/v2/models/{name}/explain", dependencies=[Depends(require_predict_key)])
async def v2_explain(name: str, request: Request) -> Response:
    return await _v2_explain(request, name, None)


@router.post("/v2/models/{name}/versions/{version}/explain", dependencies=[Depends(require_predict_key)])
async def v2_explain_version(name: str, version: str, request: Request) -> Response:
    return await _v2_explain(request, name, version)
