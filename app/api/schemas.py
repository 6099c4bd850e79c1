"""Request and response bodies. Numbers are strict: no strings, no booleans, no NaN/Infinity.

Rows (``inputs``, ``features``) and labels arrive as JSON values here: a row may be a list or
an object keyed by feature name, a label a class name, an index or regression targets, and
which is allowed depends on the served version's schema, so :mod:`app.api.rows` checks them.
Their ``json_schema_extra`` only describes them in the OpenAPI document (``app.api.openapi``);
validation stays with ``app.api.rows``. The response models are documentation too: the routes
build their answers as plain dicts (for speed) in exactly these shapes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# ---- JSON schemas of the free-form values (documentation only) ------------------------------------
_NUMBER: dict[str, Any] = {"type": "number"}
ROW_SCHEMA: dict[str, Any] = {
    "description": "one row: its numbers in schema order (nested as the input shape for multi-dimensional "
                   "inputs, or flat), or an object keyed by feature name",
    "anyOf": [{"type": "array", "minItems": 1, "items": {"anyOf": [_NUMBER, {"type": "array"}]}},
              {"type": "object", "minProperties": 1, "additionalProperties": _NUMBER}]}
LABEL_SCHEMA: dict[str, Any] = {
    "description": "classification: a class name or index; regression: a number, or a list of numbers "
                   "for several targets",
    "anyOf": [{"type": "string"}, {"type": "integer"}, _NUMBER,
              {"type": "array", "minItems": 1, "items": _NUMBER}]}
# the Open Inference Protocol's tensor data types (this server serves FP32 inputs)
V2_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                "FP16", "FP32", "FP64", "BYTES"]
TENSOR_DATA_SCHEMA: dict[str, Any] = {
    "description": "the tensor's values, flat in row-major order or nested as its shape",
    "type": "array",
    "items": {"anyOf": [_NUMBER, {"type": "array"}, {"type": "string"}, {"type": "boolean"}]}}


def _optional_array(description: str, extra: dict[str, Any] | None = None) -> Any:
    """An optional list documented as an array that may be left out (never as null)."""

    def apply(schema: dict[str, Any]) -> None:
        schema.pop("anyOf", None)
        schema.pop("default", None)
        schema.update({"type": "array", **(extra or {}), "description": description})

    return apply


# ---- requests -------------------------------------------------------------------------------------
class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # rows: lists in schema order or objects keyed by feature name
    inputs: list[Any] = Field(json_schema_extra={"minItems": 1, "items": ROW_SCHEMA})


class Sample(BaseModel):
    features: Any = Field(json_schema_extra=ROW_SCHEMA)  # a list in schema order or an object by name
    label: Any = Field(json_schema_extra=LABEL_SCHEMA)  # class name / index, or regression target(s)


class IngestRequest(BaseModel):
    samples: list[Sample] = Field(json_schema_extra={"minItems": 1})
    # printable only: Postgres refuses NUL in text, so the same key must not pass on SQLite either
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200,
                                          pattern=r"^[^\x00-\x1f\x7f]+$")] | None = Field(
        None, description="the same key again stores nothing and answers duplicate=true")


class RetrainRequest(BaseModel):
    mode: Literal["auto", "qk", "refresh", "full"] = Field(
        "auto", description="auto (default): the structural-drift rule picks qk, refresh or full; qk: "
                            "the estimator's readout only, structure frozen; refresh: the drifted "
                            "layers re-learnt for a small budget, then the readout refit; full: every weight")
    force: bool = Field(False, strict=True, description="retrain even when no sample lies beyond the "
                                                        "active version's data watermark (else 200 skipped)")


class ActivateRequest(BaseModel):
    reason: Annotated[str, Field(max_length=1000)] | None = None


class V2Tensor(BaseModel):
    name: str = Field(description='"input" (one [N, D] or [N, *input_shape] tensor), or a feature name '
                                  "(one [N] tensor per feature)")
    shape: list[Annotated[int, Field(strict=True, ge=0)]]
    datatype: str = Field(json_schema_extra={"enum": V2_DATATYPES})
    data: list[Any] | None = Field(None, json_schema_extra=_optional_array(
        TENSOR_DATA_SCHEMA["description"] + "; left out when they come as binary tensor data "
        "(parameters.binary_data_size)", TENSOR_DATA_SCHEMA))
    parameters: dict[str, Any] | None = Field(
        None, description='binary tensor data: {"binary_data_size": <bytes>}, the values then follow '
                          "the JSON part of the body (Inference-Header-Content-Length) instead of data")


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(
        None, description='{"binary_data": true}: return this output as binary tensor data')


class V2InferRequest(BaseModel):
    id: str | None = None
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None
    parameters: dict[str, Any] | None = Field(
        None, description='{"binary_data_output": true}: every output without its own binary_data '
                          "flag comes back as binary tensor data")


# ---- responses ------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    loc: str
    msg: str


class ErrorResponse(BaseModel):
    """Every error. v2 paths carry ``error`` only (the Open Inference Protocol's shape)."""

    error: str = Field(description="what is wrong, starting with the field it concerns")
    detail: list[ErrorDetail] | None = Field(None, description="422 from body validation: every error")
    job_id: str | None = Field(None, description="409 of /retrain: the job that is running")


class PredictResponse(BaseModel):
    model_version: int
    predictions: list[str | int | float | list[float]] = Field(
        description="class names (indices when the model has none); regression: values in target units "
                    "(a list per row for several targets)")
    prediction_indices: list[int] | None = Field(None, description="classification only")
    outputs: list[list[float]] = Field(description="logits per class, or regression outputs, per row")


class IngestResponse(BaseModel):
    accepted: int = Field(description="samples stored by this request (0 for a duplicate: the first "
                                      "request with this idempotency_key stored them)")
    total_samples: int
    duplicate: bool = Field(description="true: this idempotency_key was stored before; nothing stored now")


class SampleCount(BaseModel):
    total: int


class RetrainAccepted(BaseModel):
    job_id: str
    status: str
    mode: Literal["auto", "qk", "refresh", "full"] = Field(
        description="as requested; the job's result says which ran")


class RetrainSkipped(BaseModel):
    status: Literal["skipped"]
    reason: str
    active_version: int | None
    data_watermark: int | None = Field(description="the active version's: the largest sample id it saw")
    new_samples: int = Field(description="samples beyond that watermark: 0")


class RetrainJob(BaseModel):
    job_id: str
    status: str = Field(description="queued | running | succeeded | failed | cancelled")
    mode: str = Field(description="as requested (auto | qk | refresh | full); result.mode: the one that ran")
    runner: str
    progress: dict[str, Any] = Field(description="phase (loading, features, refit, training, evaluating, "
                                                 "registering, done) and the solver's numbers")
    result: dict[str, Any]
    error: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    updated_at: str | None = Field(None, description="last write to the job row (the worker's heartbeat)")
    queued_for_s: float | None = Field(None, description="how long it waited for a runner (still queued: "
                                                         "so far)")
    workers_online: int | None = Field(None, description="distributed: workers consuming the retrain "
                                                         "queue now; null in embedded mode")


class CancelResult(BaseModel):
    job_id: str
    status: Literal["cancelled", "cancelling"]


class ModelVersion(BaseModel):
    version: int
    parent: int | None
    mode: str
    created_at: str
    metrics: dict[str, Any]
    active: bool
    data_watermark: int | None
    job_id: str | None
    architecture: str | None
    selector_sha256: str
    estimator_sha256: str
    schema_: dict[str, Any] | None = Field(alias="schema", description="the version's feature schema")


class ActivateResult(BaseModel):
    active_version: int
    previous_version: int | None
    serving_version: int | None


class StoreHealth(BaseModel):
    store: Literal["up", "down"]
    backend: str
    error: str | None = Field(None, description="why the store is down")


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool
    error: str | None = None


class V2MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2MetadataTensor]
    outputs: list[V2MetadataTensor]
    active_version: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="feature names, task, class/target names")


class V2ModelReady(BaseModel):
    name: str
    ready: bool
    version: str | None = None
    error: str | None = None


class V2OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = Field(None, json_schema_extra=_optional_array(
        "the values, flat in row-major order; absent when the output is binary tensor data"))
    parameters: dict[str, Any] | None = Field(
        None, description='binary tensor data: {"binary_data_size": <bytes>} (the application/octet-stream '
                          "answer)")


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str
    outputs: list[V2OutputTensor]
    parameters: dict[str, Any] | None = None
