"""A stored version's feature schema, without torch (the file importer and the API use it)."""

from __future__ import annotations

from typing import Any

from app.core.features import FeatureSchema
from app.core.spec import ArchSpec
from app.storage import VersionRecord


def schema_of(record: VersionRecord, spec: ArchSpec | None = None) -> FeatureSchema:
    """A version's feature schema; versions stored before schemas existed get the default one."""
    if record.feature_schema:
        return FeatureSchema.from_dict(record.feature_schema)
    spec = spec or ArchSpec.from_dict(record.architecture)
    return FeatureSchema.default(spec.input_shape, spec.num_outputs)


def public_schema(schema: FeatureSchema, spec: ArchSpec) -> dict[str, Any]:
    """The schema as clients see it (GET /models): with the model's input normalisation."""
    norm = ({"type": "standard", "mean": list(spec.input_norm[0]), "std": list(spec.input_norm[1])}
            if spec.input_norm is not None else {"type": "none"})
    return {**schema.to_dict(), "normalization": norm}
