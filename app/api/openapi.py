"""The published OpenAPI document: request bodies, the real status codes and ``X-API-Key``.

The routes read raw bodies (for speed and for their own error messages), so FastAPI infers
neither their bodies nor their answers. ``OPERATIONS`` says, per ``(method, path)``, which
pydantic model the body is, what each status returns and which key scope the call needs;
``install_openapi`` writes that into ``app.openapi()``. A new route adds one entry here
(or calls ``describe()`` from its own module); ``tests/api/test_openapi_fuzz.py`` fails on a
route without one and fuzzes the document against a real server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from app.api.auth import HEADER, Scope
from app.api.explain_schemas import (
    ExplainRequest,
    ExplainResponse,
    KServeExplainRequest,
    KServeExplainResponse,
)
from app.api.samples_admin import (
    SampleActionResult,
    SampleAuditPage,
    SampleDeleteRequest,
    SamplePage,
    SampleSelector,
)
from app.api.schemas import (
    ActivateRequest,
    ActivateResult,
    CancelResult,
    ErrorResponse,
    IngestRequest,
    IngestResponse,
    ModelVersion,
    PredictRequest,
    PredictResponse,
    RetrainAccepted,
    RetrainJob,
    RetrainRequest,
    RetrainSkipped,
    SampleCount,
    StoreHealth,
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
)
from app.api.v2_binary import HEADER as V2_HEADER
from app.api.v2_binary import document_binary
from app.settings import Settings

SECURITY_SCHEME = "ApiKeyAuth"
_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Media:
    """A non-JSON body, e.g. the Prometheus text of ``/metrics``."""

    media_type: str
    schema: Mapping[str, Any]


@dataclass(frozen=True)
class Operation:
    """One route: success bodies per status, error statuses, request body, key scope."""

    ok: Mapping[int, Any]  # status → a pydantic model / type (JSON body) or a Media
    errors: tuple[int, ...] = ()  # answered with ErrorResponse; 401/403 are added from ``scope``
    request: type | None = None  # the JSON body's model
    body_required: bool = True  # False: an empty body means the defaults
    scope: Scope | None = None  # the X-API-Key scope; None: open to everyone
    notes: Mapping[int, str] = field(default_factory=dict)  # per-status wording beyond the usual
    headers: Mapping[int, Mapping[str, str]] = field(default_factory=dict)  # always-sent headers


ERROR_TEXT = {
    400: "malformed JSON, an empty body, or a key given twice in one object",
    401: f"{HEADER} missing or matching no key",
    403: f"{HEADER} valid but without this endpoint's scope",
    404: "no such model, version, job or sample",
    408: "the request body did not arrive in time",
    409: "conflict with the current state (the message says which)",
    413: "body over SKQK_MAX_BODY_BYTES",
    415: "Content-Type is not application/json",
    422: "the body or a parameter does not fit; the message names the field",
    503: "not ready (no model loaded yet, queue full, store or retrain queue unavailable); "
         "retry after Retry-After",
}
BODY_ERRORS = (400, 408, 413, 415, 422)  # every route that reads a JSON body
RETRY_AFTER = {503: {"Retry-After": "seconds to wait before retrying"}}
# v2 infer also speaks the binary tensor data extension (app/api/v2_binary.py adds its media types)
V2_NOTES = {200: f"success; application/octet-stream with {V2_HEADER} when an output was asked for as "
                 "binary tensor data",
            400: f"{ERROR_TEXT[400]}; binary tensor data framed wrongly ({V2_HEADER}, "
                 "parameters.binary_data_size)",
            415: "Content-Type is neither application/json nor application/octet-stream (none is fine)"}
EXPLAIN_NOTES = {413: "body over SKQK_MAX_BODY_BYTES, or rows × Jacobian size over SKQK_EXPLAIN_MAX_ELEMENTS "
                      "(the message says how many rows fit)"}
V2_EXPLAIN_NOTES = {**EXPLAIN_NOTES,
                    200: "the explain extension: outputs predictions, output_values, explained_outputs, "
                         "contributions [N, K', features], intercept, active_units, radius_l2, radius_linf; "
                         'request parameters "reference" and "outputs" as for /explain'}
V2_BINARY = {("POST", "/v2/models/{name}/infer"), ("POST", "/v2/models/{name}/versions/{version}/infer")}

OPERATIONS: dict[tuple[str, str], Operation] = {
    # ---- inference
    ("POST", "/predict"): Operation(
        {200: PredictResponse}, (*BODY_ERRORS, 503), PredictRequest, scope="predict"),
    ("GET", "/v2"): Operation({200: V2ServerMetadata}),
    ("GET", "/v2/health/live"): Operation({200: V2Live}),
    ("GET", "/v2/health/ready"): Operation({200: V2Ready, 503: V2Ready}),
    ("GET", "/v2/models/{name}"): Operation({200: V2ModelMetadata}, (404, 503)),
    ("GET", "/v2/models/{name}/ready"): Operation({200: V2ModelReady, 503: V2ModelReady}, (404,)),
    ("GET", "/v2/models/{name}/versions/{version}"): Operation({200: V2ModelMetadata}, (404, 503)),
    ("GET", "/v2/models/{name}/versions/{version}/ready"): Operation(
        {200: V2ModelReady, 503: V2ModelReady}, (404,)),
    ("POST", "/v2/models/{name}/infer"): Operation(
        {200: V2InferResponse}, (*BODY_ERRORS, 404, 503), V2InferRequest, scope="predict", notes=V2_NOTES),
    ("POST", "/v2/models/{name}/versions/{version}/infer"): Operation(
        {200: V2InferResponse}, (*BODY_ERRORS, 404, 503), V2InferRequest, scope="predict", notes=V2_NOTES),
    # ---- explanations (app/api/explain.py)
    ("POST", "/explain"): Operation({200: ExplainResponse}, (*BODY_ERRORS, 503), ExplainRequest,
                                    scope="predict", notes=EXPLAIN_NOTES),
    ("POST", "/v1/models/{name}:explain"): Operation(
        {200: KServeExplainResponse}, (*BODY_ERRORS, 404, 503), KServeExplainRequest, scope="predict",
        notes=EXPLAIN_NOTES),
    ("POST", "/v2/models/{name}/explain"): Operation(
        {200: V2InferResponse}, (*BODY_ERRORS, 404, 503), V2InferRequest, scope="predict",
        notes=V2_EXPLAIN_NOTES),
    ("POST", "/v2/models/{name}/versions/{version}/explain"): Operation(
        {200: V2InferResponse}, (*BODY_ERRORS, 404, 503), V2InferRequest, scope="predict",
        notes=V2_EXPLAIN_NOTES),
    # ---- data
    ("POST", "/ingest"): Operation(
        {200: IngestResponse}, (*BODY_ERRORS, 409, 503), IngestRequest, scope="ingest",
        notes={409: "idempotency_key already used for different samples"}),
    ("GET", "/samples/count"): Operation({200: SampleCount}, (503,)),
    # ---- admin
    ("POST", "/retrain"): Operation(
        {200: RetrainSkipped, 202: RetrainAccepted}, (*BODY_ERRORS, 409, 503), RetrainRequest,
        body_required=False, scope="admin",
        notes={200: "nothing new since the active version's data watermark and no force: no job, "
                    "no version",
               202: "a job was queued",
               409: "a retrain is already running (its job_id is in the body)",
               503: "no worker consumes the retrain queue (distributed; the message names it), Redis "
                    "or the store unavailable, or the server shutting down; retry after Retry-After"},
        headers={202: {"Location": "where to poll the job"}}),
    ("GET", "/retrain/{job_id}"): Operation({200: RetrainJob}, (404, 503)),
    ("POST", "/retrain/{job_id}/cancel"): Operation(
        {200: CancelResult, 202: CancelResult}, (404, 409, 503), scope="admin",
        notes={200: "a queued job: cancelled at once", 202: "a running job: stops after this epoch",
               409: "the job has already finished"}),
    ("GET", "/models"): Operation(
        {200: list[ModelVersion]}, (503,),
        headers={200: {"X-Active-Version": "the version active store-wide",
                       "X-Serving-Version": "the version this replica serves right now"}}),
    ("POST", "/models/{version}/activate"): Operation(
        {200: ActivateResult}, (*BODY_ERRORS, 404, 409, 503), ActivateRequest, body_required=False,
        scope="admin", notes={409: "the version failed to load and was not activated"}),
    ("GET", "/metrics"): Operation({200: Media("text/plain", {"type": "string"})}),
    ("GET", "/health/store"): Operation({200: StoreHealth, 503: StoreHealth},
                                        notes={503: "the store did not answer in time"}),
    # ---- sample admin (app/api/samples_admin.py)
    ("GET", "/samples"): Operation({200: SamplePage}, (422, 503), scope="admin"),
    ("POST", "/samples/quarantine"): Operation(
        {200: SampleActionResult}, (*BODY_ERRORS, 503), SampleSelector, scope="admin"),
    ("POST", "/samples/release"): Operation(
        {200: SampleActionResult}, (*BODY_ERRORS, 503), SampleSelector, scope="admin"),
    ("POST", "/samples/delete"): Operation(
        {200: SampleActionResult}, (*BODY_ERRORS, 503), SampleDeleteRequest, scope="admin"),
    ("GET", "/samples/audit"): Operation({200: SampleAuditPage}, (422, 503), scope="admin"),
}


def describe(method: str, path: str, operation: Operation) -> None:
    """Document a route from its own module (before the first ``app.openapi()`` call)."""
    OPERATIONS[(method.upper(), path)] = operation


class _Components:
    """components/schemas, filled from the models as operations refer to them."""

    def __init__(self, schemas: dict[str, Any]) -> None:
        self.schemas = schemas

    def schema_of(self, tp: Any, mode: JsonSchemaMode) -> dict[str, Any]:
        generated = TypeAdapter(tp).json_schema(mode=mode, ref_template=_REF, by_alias=True)
        for name, sub in generated.pop("$defs", {}).items():
            self._add(name, sub)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            self._add(tp.__name__, generated)  # a model: one named component, referred to
            return {"$ref": _REF.format(model=tp.__name__)}
        return generated

    def _add(self, name: str, schema: dict[str, Any]) -> None:
        if self.schemas.setdefault(name, schema) != schema:
            raise ValueError(f"two different schemas named {name!r} in the OpenAPI document")


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _header_objects(headers: Mapping[str, str], required: bool) -> dict[str, Any]:
    return {name: {"description": text, "required": required, "schema": {"type": "string"}}
            for name, text in headers.items()}


def _responses(op: Operation, enforced: bool, components: _Components) -> dict[str, Any]:
    out: dict[int, dict[str, Any]] = {}
    for status, body in op.ok.items():
        content = ({body.media_type: {"schema": dict(body.schema)}} if isinstance(body, Media)
                   else _json(components.schema_of(body, "serialization")))
        out[status] = {"description": op.notes.get(status, "success" if status < 400 else ERROR_TEXT[status]),
                       "content": content}
        if status in op.headers:
            out[status]["headers"] = _header_objects(op.headers[status], required=True)
    errors = set(op.errors) | ({401, 403} if enforced else set())
    error_schema = _json(components.schema_of(ErrorResponse, "serialization"))
    for status in sorted(errors - set(out)):
        out[status] = {"description": op.notes.get(status, ERROR_TEXT[status]), "content": error_schema}
    if 503 in out:
        out[503]["headers"] = _header_objects(RETRY_AFTER[503], required=False)
    return {str(status): out[status] for status in sorted(out)}


def _apply(doc_op: dict[str, Any], op: Operation, enforced: bool, components: _Components) -> None:
    doc_op["responses"] = _responses(op, enforced, components)
    if op.request is not None:
        doc_op["requestBody"] = {"required": op.body_required,
                                 "content": _json(components.schema_of(op.request, "validation"))}
    if enforced and op.scope is not None:
        doc_op["security"] = [{SECURITY_SCHEME: [op.scope]}]


def _describe_parameters(doc_op: dict[str, Any], settings: Settings) -> None:
    """v2 path parameters: the one model name this server serves, versions as integers."""
    for param in doc_op.get("parameters", ()):
        if param.get("in") != "path":
            continue
        if param["name"] == "name":
            param["schema"] = {"type": "string", "enum": [settings.model_name]}
            param["description"] = "the served model's name (SKQK_MODEL_NAME); any other is a 404"
        elif param["name"] == "version" and param["schema"].get("type") == "string":
            param["schema"] = {"type": "string", "pattern": "^[0-9]+$"}
            param["description"] = "a model version number (GET /models lists them)"


def _enforced_scopes(settings: Settings) -> dict[str, bool]:
    return {"admin": True, "ingest": bool(settings.ingest_api_key), "predict": bool(settings.predict_api_key)}


DESCRIPTION = f"""Errors are `{{"error": "<message naming the field>"}}` (non-v2 paths may add `detail`
or `job_id`). Request bodies are strict JSON: a key given twice in one object is a 400.

Keys go in the `{HEADER}` header (security scheme `{SECURITY_SCHEME}`; the list of an
operation's requirement names the scope it needs): the admin key (`SKQK_API_KEY`) grants
every scope; `SKQK_INGEST_API_KEY` grants `ingest` and `SKQK_PREDICT_API_KEY` grants
`predict`, and while one of those is unset its endpoints are open (and documented without
security). 401: header missing or no such key; 403: a known key without the scope."""


def build_document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary,
                      description=DESCRIPTION, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = _Components(components.setdefault("schemas", {}))
    enforced = _enforced_scopes(settings)
    for path, methods in doc.get("paths", {}).items():
        for method, doc_op in methods.items():
            _describe_parameters(doc_op, settings)
            op = OPERATIONS.get((method.upper(), path))
            if op is not None:
                _apply(doc_op, op, op.scope is not None and enforced[op.scope], schemas)
            if (method.upper(), path) in V2_BINARY:
                document_binary(doc_op)
    components["securitySchemes"] = {SECURITY_SCHEME: {
        "type": "apiKey", "in": "header", "name": HEADER,
        "description": "admin key: every scope; ingest / predict keys: their scope only"}}
    if "HTTPValidationError" not in str(doc["paths"]):  # FastAPI's default 422 bodies, unused now
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.schemas.pop(name, None)
    return doc


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve the document above at ``/openapi.json`` (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
