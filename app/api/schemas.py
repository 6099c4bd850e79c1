"""Request bodies. Numbers are strict: no strings, no booleans, no NaN/Infinity.

Rows (``inputs``, ``features``) and labels arrive as JSON values here: a row may be a list or
an object keyed by feature name, a label a class name, an index or regression targets, and
which is allowed depends on the served version's schema, so :mod:`app.api.rows` checks them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    inputs: list[Any]  # rows: lists in schema order or objects keyed by feature name


class Sample(BaseModel):
    features: Any  # a list in schema order or an object keyed by feature name
    label: Any  # class name / index, or regression target(s)


class IngestRequest(BaseModel):
    samples: list[Sample]
    # printable only: Postgres refuses NUL in text, so the same key must not pass on SQLite either
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200,
                                          pattern=r"^[^\x00-\x1f\x7f]+$")] | None = None


class RetrainRequest(BaseModel):
    mode: Literal["qk", "full"] = "qk"


class ActivateRequest(BaseModel):
    reason: Annotated[str, Field(max_length=1000)] | None = None


class V2Tensor(BaseModel):
    name: str
    shape: list[Annotated[int, Field(strict=True, ge=0)]]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    id: str | None = None
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None
