"""Between torch modules and the store: register a DecoupledModel, load a version back."""

from __future__ import annotations

from typing import Any

from app.core.checkpoint import ChecksumMismatch, model_from_bytes, model_to_bytes
from app.core.features import FeatureSchema
from app.core.network import DecoupledModel
from app.core.spec import ArchSpec
from app.serving.version_schema import public_schema, schema_of
from app.storage import Store, UnknownVersion, VersionRecord

__all__ = ["load_model", "model_from_record", "public_schema", "register_model", "schema_of"]


def register_model(store: Store, model: DecoupledModel, mode: str, parent: int | None,
                   metrics: dict[str, Any], data_watermark: int | None = None,
                   job_id: str | None = None, schema: FeatureSchema | None = None) -> int:
    """Store both nets as safetensors bytes (sha256 recorded by the store); the new version."""
    selector, estimator = model_to_bytes(model)
    if schema is not None and (schema.input_dim != model.spec.input_dim
                               or schema.num_outputs != model.spec.num_outputs):
        raise ValueError(f"schema ({schema.input_dim} features → {schema.num_outputs} outputs) does not "
                         f"fit the network ({model.spec.input_dim} → {model.spec.num_outputs})")
    return store.register_version(model.spec.to_dict(), selector, estimator, mode, parent, metrics,
                                  data_watermark, job_id,
                                  feature_schema=schema.to_dict() if schema is not None else None)


def model_from_record(record: VersionRecord) -> DecoupledModel:
    """Rebuild a version, refusing weights that do not hash to their recorded sha256."""
    if record.selector_weights is None or record.estimator_weights is None:
        raise ValueError(f"version {record.version} was loaded without its weights")
    spec = ArchSpec.from_dict(record.architecture)
    try:
        model = model_from_bytes(spec, record.selector_weights, record.estimator_weights,
                                 record.selector_sha256, record.estimator_sha256)
    except ChecksumMismatch as exc:
        raise ChecksumMismatch(f"version {record.version}: {exc}") from exc
    return model.eval()


def load_model(store: Store, version: int) -> tuple[DecoupledModel, VersionRecord]:
    record = store.get_version(version)
    if record is None:
        raise UnknownVersion(version)
    return model_from_record(record), record
