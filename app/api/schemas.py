"""Request bodies. Numbers are strict: no strings, no booleans, no NaN/Infinity."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
StrictInt = Annotated[int, Field(strict=True)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    inputs: list[list[FiniteFloat]]


class Sample(BaseModel):
    features: list[FiniteFloat]
    label: StrictInt


class IngestRequest(BaseModel):
    samples: list[Sample]
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)] | None = None


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
