"""Sample administration in SQL: list, quarantine, release, delete, and the audit trail.

Only the SQL lives here; :class:`app.storage.store.Store` exposes it as methods. Each action
changes the selected samples and appends its ``sample_audit`` row in one transaction, so the
trail never misses a change nor records one that rolled back.

- *quarantine* sets ``quarantined_at`` on rows not yet quarantined: they stay stored but
  ``Store.load_samples`` (every retrain, its holdout, bootstrap and import scoring) skips them;
- *release* clears it again;
- *delete* removes the rows for good. Their ``ingest_batches`` row stays, so a retried
  ``/ingest`` with the same key and payload is still answered "duplicate" and stores nothing,
  and sample ids are never reused (AUTOINCREMENT on SQLite, a sequence on PostgreSQL).

``affected`` counts the rows whose state changed (quarantining a row twice counts it once).
Every action is audited, also one that matched nothing: the attempt is part of the story.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, Connection, delete, func, insert, select, true, update

from app.storage.schema import SAMPLE_ACTIONS, ingest_batches, sample_audit, samples

MAX_ID = 2**63 - 1  # BIGINT (PostgreSQL) and SQLite's INTEGER
MAX_SELECTOR_IDS = 10_000  # one IN (…) list; a range covers more
MAX_PAGE = 1000
MAX_KEY_LENGTH = 200  # ingest_batches.idempotency_key
MAX_ACTOR_LENGTH = 200  # sample_audit.actor
SELECTORS = "ids, from_id/to_id, ingest_key, batch_id"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SelectionError(ValueError):
    """A selector that names no rows, several kinds of rows, or impossible ones."""


def _utc(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo is not None else value.replace(tzinfo=UTC)


def _utc_required(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _check_id(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise SelectionError(f"{name}: must be an integer from 1 to {MAX_ID}, got {value!r}")
    return value


def check_ingest_key(name: str, key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or _CONTROL.search(key):
        raise SelectionError(f"{name}: must be 1 to {MAX_KEY_LENGTH} printable characters")
    return key


@dataclass(frozen=True)
class SampleSelection:
    """Which samples an action applies to: exactly one of the four kinds of selector.

    ``from_id``/``to_id`` are one selector (inclusive bounds; either may be left open).
    """

    ids: tuple[int, ...] | None = None
    from_id: int | None = None
    to_id: int | None = None
    ingest_key: str | None = None
    batch_id: int | None = None

    def __post_init__(self) -> None:
        ranged = self.from_id is not None or self.to_id is not None
        given = [name for name, present in (
            ("ids", self.ids is not None), ("from_id/to_id", ranged),
            ("ingest_key", self.ingest_key is not None), ("batch_id", self.batch_id is not None)) if present]
        if not given:
            raise SelectionError(f"no selector: give exactly one of {SELECTORS}")
        if len(given) > 1:
            raise SelectionError(f"several selectors ({', '.join(given)}): give exactly one of {SELECTORS}")
        if self.ids is not None:
            if not self.ids:
                raise SelectionError("ids: give at least one sample id")
            if len(self.ids) > MAX_SELECTOR_IDS:
                raise SelectionError(f"ids: at most {MAX_SELECTOR_IDS} ids per action (got {len(self.ids)}); "
                                     "select a range with from_id/to_id instead")
            for i, value in enumerate(self.ids):
                _check_id(f"ids[{i}]", value)
        for name in ("from_id", "to_id", "batch_id"):
            if getattr(self, name) is not None:
                _check_id(name, getattr(self, name))
        if self.from_id is not None and self.to_id is not None and self.from_id > self.to_id:
            raise SelectionError(f"from_id: {self.from_id} is greater than to_id {self.to_id}")
        if self.ingest_key is not None:
            check_ingest_key("ingest_key", self.ingest_key)

    def to_json(self) -> dict[str, Any]:
        """The selector as given (what the audit trail records)."""
        if self.ids is not None:
            return {"ids": list(self.ids)}
        if self.ingest_key is not None:
            return {"ingest_key": self.ingest_key}
        if self.batch_id is not None:
            return {"batch_id": self.batch_id}
        return {k: v for k, v in (("from_id", self.from_id), ("to_id", self.to_id)) if v is not None}

    def where(self) -> ColumnElement[bool]:
        if self.ids is not None:
            return samples.c.id.in_(sorted(set(self.ids)))
        if self.ingest_key is not None:
            return samples.c.batch_id.in_(select(ingest_batches.c.id).where(
                ingest_batches.c.idempotency_key == self.ingest_key).scalar_subquery())
        if self.batch_id is not None:
            return samples.c.batch_id == self.batch_id
        return id_range(self.from_id, self.to_id)


def id_range(from_id: int | None, to_id: int | None) -> ColumnElement[bool]:
    clause: ColumnElement[bool] = true()
    if from_id is not None:
        clause = clause & (samples.c.id >= from_id)
    if to_id is not None:
        clause = clause & (samples.c.id <= to_id)
    return clause


@dataclass
class SampleActionOutcome:
    action: str
    affected: int
    audit_id: int


@dataclass
class StoredSample:
    id: int
    batch_id: int
    ingest_key: str | None
    created_at: datetime | None
    n_features: int
    label: int | None  # class index; None for a regression row
    targets: list[float] | None  # regression targets
    quarantined_at: datetime | None
    quarantine_audit_id: int | None
    quarantine_reason: str | None
    features: list[float] | None = None  # only when asked for

    @property
    def quarantined(self) -> bool:
        return self.quarantined_at is not None

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "batch_id": self.batch_id, "ingest_key": self.ingest_key,
               "created_at": self.created_at.isoformat() if self.created_at else None,
               "n_features": self.n_features, "label": self.label, "targets": self.targets,
               "quarantined": self.quarantined,
               "quarantined_at": self.quarantined_at.isoformat() if self.quarantined_at else None,
               "quarantine_audit_id": self.quarantine_audit_id, "quarantine_reason": self.quarantine_reason}
        if self.features is not None:
            out["features"] = self.features
        return out


@dataclass
class SampleListing:
    rows: list[StoredSample] = field(default_factory=list)
    next_after_id: int | None = None  # pass as after_id for the next page; None: last page


@dataclass
class SampleAuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    selector: dict[str, Any]
    affected: int
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at.isoformat(), "actor": self.actor, "action": self.action,
                "selector": self.selector, "affected": self.affected, "reason": self.reason}


@dataclass
class SampleAuditTrail:
    entries: list[SampleAuditEntry] = field(default_factory=list)
    next_before_id: int | None = None  # pass as before_id for older entries; None: the first one


def apply_action(conn: Connection, action: str, selection: SampleSelection, actor: str,
                 reason: str | None) -> SampleActionOutcome:
    """Change the selected rows and append the audit row, on ``conn``'s open transaction."""
    if action not in SAMPLE_ACTIONS:
        raise ValueError(f"action must be one of {SAMPLE_ACTIONS}, got {action!r}")
    if reason is not None and "\x00" in reason:  # PostgreSQL text cannot hold it
        raise ValueError("reason: must not contain NUL characters")
    now = datetime.now(UTC)
    # the audit row first: quarantined rows point at it
    audit_id = int(conn.execute(insert(sample_audit).values(
        at=now, actor=actor[:MAX_ACTOR_LENGTH], action=action, selector=selection.to_json(),
        affected=0, reason=reason)).inserted_primary_key[0])
    where = selection.where()
    if action == "quarantine":
        res = conn.execute(update(samples).where(where, samples.c.quarantined_at.is_(None))
                           .values(quarantined_at=now, quarantine_audit_id=audit_id))
    elif action == "release":
        res = conn.execute(update(samples).where(where, samples.c.quarantined_at.is_not(None))
                           .values(quarantined_at=None, quarantine_audit_id=None))
    else:
        res = conn.execute(delete(samples).where(where))
    affected = int(res.rowcount)
    record_affected(conn, audit_id, affected)
    return SampleActionOutcome(action, affected, audit_id)


def record_affected(conn: Connection, audit_id: int, affected: int) -> None:
    conn.execute(update(sample_audit).where(sample_audit.c.id == audit_id).values(affected=affected))


def list_samples(conn: Connection, *, from_id: int | None = None, to_id: int | None = None,
                 batch_id: int | None = None, ingest_key: str | None = None,
                 quarantined: bool | None = None, after_id: int | None = None, limit: int = 100,
                 features: bool = False) -> SampleListing:
    """One page of samples in id order (keyset: ``after_id`` is the last id of the previous page)."""
    if not 1 <= limit <= MAX_PAGE:
        raise SelectionError(f"limit: must be from 1 to {MAX_PAGE}, got {limit}")
    cols = [samples.c.id, samples.c.batch_id, ingest_batches.c.idempotency_key, samples.c.created_at,
            samples.c.n_features, samples.c.label, samples.c.targets, samples.c.quarantined_at,
            samples.c.quarantine_audit_id, sample_audit.c.reason]
    if features:
        cols.append(samples.c.features)
    query = (select(*cols)
             .join(ingest_batches, ingest_batches.c.id == samples.c.batch_id)
             .outerjoin(sample_audit, sample_audit.c.id == samples.c.quarantine_audit_id)
             .where(id_range(from_id, to_id)))
    if after_id is not None:
        query = query.where(samples.c.id > after_id)
    if batch_id is not None:
        query = query.where(samples.c.batch_id == batch_id)
    if ingest_key is not None:
        query = query.where(ingest_batches.c.idempotency_key == ingest_key)
    if quarantined is not None:
        q = samples.c.quarantined_at
        query = query.where(q.is_not(None) if quarantined else q.is_(None))
    rows = conn.execute(query.order_by(samples.c.id).limit(limit + 1)).all()
    more = len(rows) > limit
    page = [_stored(r, features) for r in rows[:limit]]
    return SampleListing(page, page[-1].id if more else None)


def _floats(blob: bytes | None) -> list[float] | None:
    return None if blob is None else np.frombuffer(blob, dtype="<f4").astype(float).tolist()


def _stored(row: Any, features: bool) -> StoredSample:
    return StoredSample(
        id=row.id, batch_id=row.batch_id, ingest_key=row.idempotency_key, created_at=_utc(row.created_at),
        n_features=row.n_features, label=row.label, targets=_floats(row.targets),
        quarantined_at=_utc(row.quarantined_at), quarantine_audit_id=row.quarantine_audit_id,
        quarantine_reason=row.reason, features=_floats(row.features) if features else None)


def count_selected(conn: Connection, selection: SampleSelection) -> int:
    """How many stored rows a selector matches (e.g. to confirm a delete before doing it)."""
    return int(conn.execute(select(func.count()).select_from(samples).where(selection.where())).scalar_one())


def quarantined_count(conn: Connection) -> int:
    # served by the partial index ix_samples_quarantined
    return int(conn.execute(select(func.count()).select_from(samples)
                            .where(samples.c.quarantined_at.is_not(None))).scalar_one())


def list_audit(conn: Connection, limit: int = 100, before_id: int | None = None) -> SampleAuditTrail:
    """Newest first; ``before_id`` (the previous page's ``next_before_id``) pages back in time."""
    if not 1 <= limit <= MAX_PAGE:
        raise SelectionError(f"limit: must be from 1 to {MAX_PAGE}, got {limit}")
    query = select(sample_audit).order_by(sample_audit.c.id.desc()).limit(limit + 1)
    if before_id is not None:
        query = query.where(sample_audit.c.id < before_id)
    entries = [SampleAuditEntry(r["id"], _utc_required(r["at"]), r["actor"], r["action"], r["selector"],
                                int(r["affected"]), r["reason"])
               for r in conn.execute(query).mappings()]
    more = len(entries) > limit
    return SampleAuditTrail(entries[:limit], entries[limit - 1].id if more else None)


def selection_from(ids: Iterable[int] | None = None, from_id: int | None = None, to_id: int | None = None,
                   ingest_key: str | None = None, batch_id: int | None = None) -> SampleSelection:
    """Build (and check) a selection; ``SelectionError`` names the offending field."""
    return SampleSelection(tuple(ids) if ids is not None else None, from_id, to_id, ingest_key, batch_id)
