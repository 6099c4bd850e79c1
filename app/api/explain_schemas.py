"""Request and response bodies of ``/explain``, the v2 explain extension and KServe v1 ``:explain``.

The response models document the answers (the routes build plain dicts in these shapes).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.api.schemas import ROW_SCHEMA, _optional_array

REFERENCE_SCHEMA: dict[str, Any] = {
    "description": '"mean" (default: the training mean stored with the version; versions stored before '
                   'it fall back to the normalisation mean, else zero, and the answer says which), '
                   '"zero", or one row (a list in schema order or an object keyed by feature name)',
    "anyOf": [{"type": "string", "enum": ["mean", "zero"]}, *ROW_SCHEMA["anyOf"]]}
OUTPUTS_SCHEMA: dict[str, Any] = {
    "description": '"predicted" (default: the predicted class; regression: every target), "all", or one '
                   "class name / class index / target name",
    "anyOf": [{"type": "string"}, {"type": "integer"}]}


def _optional(schema: dict[str, Any]) -> Any:
    """An optional value documented as ``schema`` that may be left out (never as null)."""

    def apply(target: dict[str, Any]) -> None:
        target.pop("default", None)
        target.update(schema)

    return apply


RADIUS_TEXT = ("false: skip the certified radius (null) and every hidden unit's gradient; the "
               "contributions stay exact and cost one reverse pass per output instead of ~D forward passes")


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt "refrence" must not silently mean "mean"
    inputs: list[Any] = Field(json_schema_extra={"minItems": 1, "items": ROW_SCHEMA})
    reference: Any = Field(None, json_schema_extra=_optional(REFERENCE_SCHEMA))
    outputs: Any = Field(None, json_schema_extra=_optional(OUTPUTS_SCHEMA))
    radius: bool = Field(True, strict=True, description=RADIUS_TEXT)


class KServeExplainRequest(BaseModel):
    """KServe v1: ``instances`` (or ``inputs``) are rows as for ``/predict``."""

    model_config = ConfigDict(extra="forbid")
    instances: list[Any] | None = Field(None, json_schema_extra=_optional_array(
        "rows, as for /predict", {"minItems": 1, "items": ROW_SCHEMA}))
    inputs: list[Any] | None = Field(None, json_schema_extra=_optional_array(
        "the same, under the name inputs (give one of the two)", {"minItems": 1, "items": ROW_SCHEMA}))
    reference: Any = Field(None, json_schema_extra=_optional(REFERENCE_SCHEMA))
    outputs: Any = Field(None, json_schema_extra=_optional(OUTPUTS_SCHEMA))
    radius: bool = Field(True, strict=True, description=RADIUS_TEXT)


class Radius(BaseModel):
    l2: float | None = Field(description="raw input units; null: no structural layer bounds it, or not "
                                         "asked for (radius: false)")
    linf: float | None


class OutputExplanation(BaseModel):
    output: Any = Field(description="the class name (index when the model has none) or target name")
    value: float = Field(description="the output (logit / target value) = intercept + Σ contributions")
    intercept: float = Field(description="A(x)·r + c(x): the output at the reference under x's structure")
    contributions: dict[str, float] = Field(description="A_j(x)·(x_j − r_j) per feature name")


class RowExplanation(BaseModel):
    prediction: Any
    prediction_index: int | None = Field(None, description="classification only")
    outputs: list[OutputExplanation]
    active_units: int = Field(description="gates on for this row")
    total_units: int
    certified_radius: Radius = Field(description="no gate and no max-pool choice changes within this "
                                                 "distance of the row: the explanation is the model there")


class Reference(BaseModel):
    source: str = Field(description="training_mean | normalization_mean | zero | client")
    values: dict[str, float]


class ExplainResponse(BaseModel):
    model_version: int
    reference: Reference
    explanations: list[RowExplanation]


class KServeExplainResponse(BaseModel):
    predictions: list[Any]
    explanations: list[RowExplanation]
    model_version: int
