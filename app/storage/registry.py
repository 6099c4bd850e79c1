"""The model registry: versions (weights as safetensors bytes with their sha256), the active
pointer (compare-and-set) and the promotion history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from app.storage.base import as_utc, clean_json, sha256_hex, utcnow
from app.storage.schema import active_model, model_versions, promotions


class UnknownVersion(LookupError):
    def __init__(self, version: int) -> None:
        super().__init__(f"model version {version} does not exist")
        self.version = version


@dataclass
class VersionRecord:
    version: int
    parent: int | None
    mode: str
    created_at: datetime
    architecture: dict[str, Any]
    selector_sha256: str
    estimator_sha256: str
    metrics: dict[str, Any]
    data_watermark: int | None
    job_id: str | None
    selector_weights: bytes | None = None
    estimator_weights: bytes | None = None
    feature_schema: dict[str, Any] | None = None  # None: stored before schemas existed

    def summary(self, active: bool) -> dict[str, Any]:
        return {"version": self.version, "parent": self.parent, "mode": self.mode,
                "created_at": self.created_at.isoformat(), "metrics": self.metrics,
                "active": active, "data_watermark": self.data_watermark, "job_id": self.job_id,
                "architecture": self.architecture.get("name"),
                "selector_sha256": self.selector_sha256, "estimator_sha256": self.estimator_sha256}


@dataclass
class Promotion:
    version: int
    previous_version: int | None
    actor: str
    reason: str
    at: datetime


class RegistryRepository:
    """Store methods for versions and promotions (mixed into :class:`app.storage.store.Store`)."""

    engine: Engine

    # ---- model versions --------------------------------------------------------------------
    def register_version(self, architecture: dict[str, Any], selector_weights: bytes,
                         estimator_weights: bytes, mode: str, parent: int | None,
                         metrics: dict[str, Any], data_watermark: int | None = None,
                         job_id: str | None = None, feature_schema: dict[str, Any] | None = None) -> int:
        if mode not in ("qk", "refresh", "full", "import"):  # import: a network trained elsewhere
            raise ValueError(f"mode must be qk, refresh, full or import, got {mode!r}")
        with self.engine.begin() as conn:
            res = conn.execute(insert(model_versions).values(
                parent=parent, mode=mode, created_at=utcnow(), architecture=clean_json(architecture),
                selector_weights=selector_weights, selector_sha256=sha256_hex(selector_weights),
                estimator_weights=estimator_weights, estimator_sha256=sha256_hex(estimator_weights),
                metrics=clean_json(metrics), data_watermark=data_watermark, job_id=job_id,
                feature_schema=clean_json(feature_schema)))
            return int(res.inserted_primary_key[0])

    _SUMMARY_COLUMNS = tuple(c for c in model_versions.c
                             if c.name not in ("selector_weights", "estimator_weights"))

    @staticmethod
    def _version(row: Any) -> VersionRecord:
        m = dict(row)
        return VersionRecord(
            version=m["version"], parent=m["parent"], mode=m["mode"],
            created_at=as_utc(m["created_at"]), architecture=m["architecture"],
            selector_sha256=m["selector_sha256"], estimator_sha256=m["estimator_sha256"],
            metrics=m["metrics"] or {}, data_watermark=m["data_watermark"], job_id=m["job_id"],
            selector_weights=m.get("selector_weights"), estimator_weights=m.get("estimator_weights"),
            feature_schema=m.get("feature_schema"))

    def get_version(self, version: int, weights: bool = True) -> VersionRecord | None:
        cols = list(model_versions.c) if weights else list(self._SUMMARY_COLUMNS)
        with self.engine.connect() as conn:
            row = conn.execute(select(*cols).where(model_versions.c.version == version)).mappings().first()
        return self._version(row) if row else None

    def list_versions(self) -> list[VersionRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(*self._SUMMARY_COLUMNS).order_by(model_versions.c.version)).mappings()
            return [self._version(r) for r in rows]

    def latest_version(self) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(model_versions.c.version))).scalar_one()

    def _set_weights_for_tests(self, version: int, **columns: Any) -> None:
        """Overwrite stored columns of a version (tests: simulate corruption)."""
        with self.engine.begin() as conn:
            conn.execute(update(model_versions).where(model_versions.c.version == version).values(**columns))

    # ---- active version + promotion history -------------------------------------------------
    def active_version(self) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(select(active_model.c.version).where(active_model.c.id == 1)).scalar()

    def compare_and_set_active(self, version: int, expected: int | None, actor: str,
                               reason: str) -> bool:
        """Point the active version at ``version`` only if it is still ``expected``.

        The conditional UPDATE and the history row commit together, so a stale worker that
        trained against an older champion cannot overwrite a newer promotion.
        """
        if self.get_version(version, weights=False) is None:
            raise UnknownVersion(version)
        current = (active_model.c.version.is_(None) if expected is None
                   else active_model.c.version == expected)
        now = utcnow()
        with self.engine.begin() as conn:
            res = conn.execute(update(active_model).where(active_model.c.id == 1, current)
                               .values(version=version, updated_at=now))
            if res.rowcount != 1:
                return False
            conn.execute(insert(promotions).values(version=version, previous_version=expected,
                                                   actor=actor[:100], reason=reason, at=now))
        return True

    def activate(self, version: int, actor: str, reason: str, attempts: int = 20) -> int | None:
        """Unconditional activation (rollback / roll-forward); returns the previous version."""
        for _ in range(attempts):
            previous = self.active_version()
            if self.compare_and_set_active(version, previous, actor, reason):
                return previous
        raise RuntimeError(f"could not activate version {version}: the pointer kept changing")

    def promotions(self, limit: int = 100) -> list[Promotion]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(promotions).order_by(promotions.c.id.desc()).limit(limit)).mappings()
            return [Promotion(r["version"], r["previous_version"], r["actor"], r["reason"],
                              as_utc(r["at"])) for r in rows]

