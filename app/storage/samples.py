"""Samples: durable ingest (idempotent batches), reads for retrains (keyset pages, by id,
by range) and sample administration (quarantine, release, delete, audit; SQL in
:mod:`app.storage.sample_admin`)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, insert, select
from sqlalchemy.exc import IntegrityError

from app.storage import sample_admin
from app.storage.base import utcnow
from app.storage.sample_admin import (
    SampleActionOutcome,
    SampleAuditTrail,
    SampleListing,
    SampleSelection,
)
from app.storage.schema import ingest_batches, sample_audit, sample_counts, samples

log = logging.getLogger("skqk.storage")


class IdempotencyConflict(ValueError):
    """The idempotency key was already used for a different payload."""


@dataclass
class IngestResult:
    accepted: int
    duplicate: bool
    batch_id: int
    total_samples: int


@dataclass
class SampleSet:
    ids: np.ndarray  # int64 [N], ascending
    x: np.ndarray  # float32 [N, D]
    y: np.ndarray  # int64 [N] class labels, or float32 [N, T] regression targets

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _sample_set(rows: list[Any], n_features: int, n_targets: int | None) -> SampleSet:
    """(id, features, label|targets) rows → a SampleSet; targets of another width are skipped."""
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    x = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), n_features)
    if n_targets is None:
        y = np.fromiter((r[2] for r in rows), dtype=np.int64, count=len(rows))
        return SampleSet(ids, x.astype(np.float32), y)
    keep = np.fromiter((len(r[2]) == 4 * n_targets for r in rows), dtype=bool, count=len(rows))
    y = np.frombuffer(b"".join(r[2] for r, k in zip(rows, keep, strict=True) if k),
                      dtype="<f4").reshape(-1, n_targets).astype(np.float32)
    return SampleSet(ids[keep], x[keep].astype(np.float32), y)


class SampleRepository:
    """Store methods for samples (mixed into :class:`app.storage.store.Store`)."""

    engine: Engine
    backend: str

    @property
    def _insert_samples_sql(self) -> str:
        style = self.engine.dialect.paramstyle
        marks = {"qmark": "?, ?, ?, ?, ?", "format": "%s, %s, %s, %s, %s", "pyformat": "%s, %s, %s, %s, %s",
                 "numeric": ":1, :2, :3, :4, :5"}.get(style)
        if marks is None:
            raise NotImplementedError(f"driver paramstyle {style!r}")
        return (f"INSERT INTO {samples.name} (batch_id, n_features, features, label, targets) "
                f"VALUES ({marks})")

    # ---- samples ---------------------------------------------------------------------------
    @staticmethod
    def payload_digest(x: np.ndarray, y: np.ndarray, raw: list[str] | None = None) -> str:
        h = hashlib.sha256(f"{x.shape[0]}x{x.shape[1]}:".encode())
        h.update(x.tobytes())
        if y.dtype.kind == "f":  # regression targets: the shape is part of the payload
            h.update(f"targets{y.shape}:".encode())
        h.update(y.tobytes())
        if raw is not None:  # table rows: what came, not only its encoding
            h.update(b"raw:" + "\n".join(raw).encode())
        return h.hexdigest()

    @staticmethod
    def _sample_rows(batch_id: int, x: np.ndarray, y: np.ndarray,
                     raw: list[str] | None = None) -> list[tuple[Any, ...]]:
        d = x.shape[1]
        if raw is not None:
            if y.dtype.kind == "f":
                return [(batch_id, d, row.tobytes(), None, t.tobytes(), r)
                        for row, t, r in zip(x, y, raw, strict=True)]
            return [(batch_id, d, row.tobytes(), label, None, r)
                    for row, label, r in zip(x, y.tolist(), raw, strict=True)]
        if y.dtype.kind == "f":  # regression: targets as float32 bytes, no class label
            return [(batch_id, d, row.tobytes(), None, t.tobytes()) for row, t in zip(x, y, strict=True)]
        return [(batch_id, d, row.tobytes(), label, None) for row, label in zip(x, y.tolist(), strict=True)]

    def _insert_samples(self, conn: Any, batch_id: int, x: np.ndarray, y: np.ndarray,
                        raw: list[str] | None = None) -> None:
        if self.backend == "sqlite":
            # One statement for the whole batch: SQLite slices each row out of one blob
            # (substr on a BLOB counts bytes) while json_each walks the labels, so no Python
            # or driver work happens per row; about 2× executemany on a file import.
            n, d = x.shape
            cols = "batch_id, n_features, features, label, targets" + (", raw" if raw is not None else "")
            if y.dtype.kind == "f":
                k = y.shape[1] * 4
                # json_each counts the rows (and, for table rows, hands each raw row over as text)
                rows = "[" + ",".join(raw if raw is not None else "0" * n) + "]"
                extra = ", value" if raw is not None else ""
                sql = (f"INSERT INTO {samples.name} ({cols}) "
                       f"SELECT ?, ?, substr(?, key * ? + 1, ?), NULL, substr(?, key * ? + 1, ?){extra} "
                       "FROM json_each(?)")
                params = (batch_id, d, x.tobytes(), 4 * d, 4 * d, y.tobytes(), k, k, rows)
            elif raw is not None and _padded_fits(encoded := [r.encode() for r in raw]):
                # raw rows as UTF-8 padded to one width W: SQLite slices row k out of one BLOB
                # (byte offsets: O(1), unlike substr on TEXT, which walks the characters)
                width = max(map(len, encoded))
                blob = b"".join(r.ljust(width) for r in encoded)
                sql = (f"INSERT INTO {samples.name} ({cols}) "
                       "SELECT ?, ?, substr(?, key * ? + 1, ?), value, NULL, "
                       "rtrim(CAST(substr(?, key * ? + 1, ?) AS TEXT)) FROM json_each(?)")
                params = (batch_id, d, x.tobytes(), 4 * d, 4 * d, blob, width, width, json.dumps(y.tolist()))
            elif raw is not None:  # a few very long rows: [[label, raw row], …] instead of padding
                pairs = "[" + ",".join(f"[{lab},{r}]" for lab, r in zip(y.tolist(), raw, strict=True)) + "]"
                sql = (f"INSERT INTO {samples.name} ({cols}) "
                       "SELECT ?, ?, substr(?, key * ? + 1, ?), json_extract(value, '$[0]'), NULL, "
                       "json_extract(value, '$[1]') FROM json_each(?)")
                params = (batch_id, d, x.tobytes(), 4 * d, 4 * d, pairs)
            else:
                sql = (f"INSERT INTO {samples.name} ({cols}) "
                       "SELECT ?, ?, substr(?, key * ? + 1, ?), value, NULL FROM json_each(?)")
                params = (batch_id, d, x.tobytes(), 4 * d, 4 * d, json.dumps(y.tolist()))
            conn.exec_driver_sql(sql, params)
            return
        rows = self._sample_rows(batch_id, x, y, raw)
        extra = ", raw" if raw is not None else ""
        if self.backend == "postgresql" and hasattr(conn.connection.dbapi_connection, "cursor"):
            # COPY streams the rows in the same transaction: ~4× executemany on a file import
            sql = (f"COPY {samples.name} (batch_id, n_features, features, label, targets{extra}) "
                   "FROM STDIN (FORMAT BINARY)")
            with conn.connection.dbapi_connection.cursor() as cur, cur.copy(sql) as copy:
                copy.set_types(["int8", "int4", "bytea", "int4", "bytea"]  # the column types
                               + (["text"] if raw is not None else []))
                for row in rows:
                    copy.write_row(row)
            return
        # straight to the driver's executemany: SQLAlchemy's per-row parameter processing
        # would cost more than the insert itself
        sql = self._insert_samples_sql
        if raw is not None:
            sql = sql.replace("targets)", "targets, raw)").replace("?)", "?, ?)").replace("%s)", "%s, %s)")
        conn.exec_driver_sql(sql, rows)

    def ingest(self, features: np.ndarray, labels: np.ndarray | Iterable[int] | None = None,
               idempotency_key: str | None = None, targets: np.ndarray | None = None,
               raw: list[str] | None = None) -> IngestResult:
        """Insert a batch of samples in one transaction; a repeated key is a no-op.

        Classification rows carry integer ``labels`` [N]; regression rows carry float
        ``targets`` [N] or [N, T] (stored as float32) instead. ``raw``: per row, the table
        values as they came (a JSON array, for schemas with column types), kept beside the
        encoded ``features``.
        """
        x = np.ascontiguousarray(features, dtype="<f4")
        if (labels is None) == (targets is None):
            raise ValueError("give either labels (classification) or targets (regression)")
        if targets is not None:
            y = np.ascontiguousarray(np.asarray(targets, dtype="<f4").reshape(x.shape[0], -1))
        else:
            y = np.ascontiguousarray(np.asarray(labels), dtype="<i8")
        if x.ndim != 2 or y.shape[0] != x.shape[0] or x.shape[0] == 0 or (targets is None and y.ndim != 1):
            raise ValueError(f"need features [N, D] and labels [N] with N > 0; got {x.shape}, {y.shape}")
        if raw is not None and len(raw) != x.shape[0]:
            raise ValueError(f"{len(raw)} raw rows for {x.shape[0]} samples")
        digest = self.payload_digest(x, y, raw)
        n = x.shape[0]
        now = utcnow()
        try:
            with self.engine.begin() as conn:
                res = conn.execute(insert(ingest_batches).values(
                    idempotency_key=idempotency_key, payload_sha256=digest, count=n, created_at=now))
                batch_id = int(res.inserted_primary_key[0])
                if raw is None:  # the numeric call as it always was
                    self._insert_samples(conn, batch_id, x, y)
                else:
                    self._insert_samples(conn, batch_id, x, y, raw)
        except IntegrityError:
            if idempotency_key is None:
                raise
            existing = self.get_ingest_batch(idempotency_key)
            if existing is None:
                raise
            if existing["payload_sha256"] != digest:
                raise IdempotencyConflict(
                    f"idempotency_key {idempotency_key!r} was already used for a different payload"
                ) from None
            return IngestResult(existing["count"], True, existing["id"], self.sample_count())
        return IngestResult(n, False, batch_id, self.sample_count())

    def get_ingest_batch(self, idempotency_key: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(ingest_batches).where(
                ingest_batches.c.idempotency_key == idempotency_key)).mappings().first()
        return dict(row) if row else None

    def sample_count(self, n_features: int | None = None) -> int:
        """Samples retrains use: every stored row except the quarantined ones.

        ``/samples/count``, ``/ingest``'s ``total_samples`` and ``skqk_samples_total`` report
        this; ``quarantined_count()`` is the rest. Without ``n_features`` it is exact and
        costs no scan: the sum of the ``sample_counts`` rows, which triggers keep in the
        transaction of every ingest, delete, quarantine and release (revision 0004).
        """
        if n_features is not None:
            query = select(func.count()).select_from(samples).where(
                samples.c.n_features == n_features, samples.c.quarantined_at.is_(None))
        else:
            query = select(func.coalesce(func.sum(sample_counts.c.n), 0))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def max_sample_id(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.max(samples.c.id), 0))).scalar_one())

    def raw_rows(self, after_id: int = 0, limit: int = 10_000) -> list[tuple[int, str | None]]:
        """(id, raw JSON row or None) of stored samples with id > ``after_id``, in id order."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(samples.c.id, samples.c.raw).where(samples.c.id > after_id)
                                .order_by(samples.c.id).limit(limit)).all()
        return [(int(i), r) for i, r in rows]

    def load_samples(self, n_features: int, max_id: int | None = None,
                     batch_id: int | Iterable[int] | None = None, n_targets: int | None = None
                     ) -> SampleSet:
        """All samples with ``n_features`` features and id ≤ ``max_id``, ordered by id.

        Quarantined samples are left out (see ``quarantine_samples``).

        ``n_targets`` None: classification rows (with a label); else regression rows with
        that many targets (y float32 [N, n_targets]).
        """
        label = samples.c.label if n_targets is None else samples.c.targets
        query = select(samples.c.id, samples.c.features, label).where(
            samples.c.n_features == n_features, label.is_not(None),
            samples.c.quarantined_at.is_(None))  # quarantined rows are out of every retrain
        if max_id is not None:
            query = query.where(samples.c.id <= max_id)
        if isinstance(batch_id, int):
            query = query.where(samples.c.batch_id == batch_id)
        elif batch_id is not None:  # several batches (a data file stored in chunks)
            query = query.where(samples.c.batch_id.in_(list(batch_id)))
        ids: list[int] = []
        feats: list[bytes] = []
        labels: list[int] = []
        with self.engine.connect() as conn:
            for row in conn.execute(query.order_by(samples.c.id)).yield_per(10_000):
                ids.append(row[0])
                feats.append(row[1])
                labels.append(row[2])
        x = np.frombuffer(b"".join(feats), dtype="<f4").reshape(len(ids), n_features)
        if n_targets is None:
            y = np.asarray(labels, dtype=np.int64)
        else:  # rows stored with another number of targets belong to another model: skip them
            keep = [len(t) == 4 * n_targets for t in labels]
            y = np.frombuffer(b"".join(t for t, k in zip(labels, keep, strict=True) if k),
                              dtype="<f4").reshape(-1, n_targets).astype(np.float32)
            ids = [i for i, k in zip(ids, keep, strict=True) if k]
            x = x[np.asarray(keep, dtype=bool)] if len(keep) else x
        return SampleSet(np.asarray(ids, dtype=np.int64), x.astype(np.float32), y)

    def _usable_rows(self, columns: list[Any], n_features: int, n_targets: int | None) -> Any:
        """SELECT ``columns`` of the rows a retrain may use (the filters of ``load_samples``)."""
        label = samples.c.label if n_targets is None else samples.c.targets
        return select(*columns).where(samples.c.n_features == n_features, label.is_not(None),
                                      samples.c.quarantined_at.is_(None))

    def iter_samples(self, n_features: int, *, after_id: int | None = None, max_id: int | None = None,
                     n_targets: int | None = None, chunk_rows: int = 65_536) -> Iterator[SampleSet]:
        """``load_samples`` in chunks of at most ``chunk_rows`` rows, ids in (after_id, max_id].

        Keyset pagination (``WHERE id > :last ORDER BY id LIMIT n``, a primary-key range scan on
        SQLite and Postgres alike): every chunk is its own short query, so memory is bounded by
        one chunk whatever the table size, and no cursor or transaction stays open between
        chunks (a retrain that streams for minutes holds no snapshot back from VACUUM).
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be ≥ 1, got {chunk_rows}")
        label = samples.c.label if n_targets is None else samples.c.targets
        base = self._usable_rows([samples.c.id, samples.c.features, label], n_features, n_targets)
        if max_id is not None:
            base = base.where(samples.c.id <= max_id)
        last = after_id if after_id is not None else 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(base.where(samples.c.id > last).order_by(samples.c.id)
                                    .limit(chunk_rows)).all()
            if not rows:
                return
            last = int(rows[-1][0])
            chunk = _sample_set(rows, n_features, n_targets)
            if len(chunk):
                yield chunk
            if len(rows) < chunk_rows:
                return

    def load_samples_by_ids(self, n_features: int, ids: np.ndarray, n_targets: int | None = None,
                            batch: int = 500) -> SampleSet:
        """The usable rows among ``ids`` (ascending), fetched ``batch`` ids per query."""
        label = samples.c.label if n_targets is None else samples.c.targets
        base = self._usable_rows([samples.c.id, samples.c.features, label], n_features, n_targets)
        wanted = np.unique(np.asarray(ids, dtype=np.int64))
        rows: list[Any] = []
        with self.engine.connect() as conn:
            for i in range(0, len(wanted), batch):
                part = [int(v) for v in wanted[i:i + batch]]
                rows.extend(conn.execute(base.where(samples.c.id.in_(part)).order_by(samples.c.id)).all())
        return _sample_set(rows, n_features, n_targets)

    def usable_ids_between(self, n_features: int, lo: int, hi: int,
                           n_targets: int | None = None) -> np.ndarray:
        """Ids of the usable rows in (lo, hi], ascending (no feature bytes are read)."""
        query = self._usable_rows([samples.c.id], n_features, n_targets).where(
            samples.c.id > lo, samples.c.id <= hi).order_by(samples.c.id)
        with self.engine.connect() as conn:
            return np.fromiter((r[0] for r in conn.execute(query)), dtype=np.int64)

    def sample_audit_mark(self) -> int:
        """The newest sample_audit id (0: none): it moves on every quarantine, release, delete."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.max(sample_audit.c.id), 0))).scalar_one())

    # ---- sample administration (SQL in app.storage.sample_admin) ------------------------------
    def quarantined_count(self) -> int:
        with self.engine.connect() as conn:
            return sample_admin.quarantined_count(conn)

    def count_selected(self, selection: SampleSelection) -> int:
        """Stored rows (quarantined or not) that ``selection`` matches."""
        with self.engine.connect() as conn:
            return sample_admin.count_selected(conn, selection)

    def list_samples(self, *, from_id: int | None = None, to_id: int | None = None,
                     batch_id: int | None = None, ingest_key: str | None = None,
                     quarantined: bool | None = None, after_id: int | None = None, limit: int = 100,
                     features: bool = False) -> SampleListing:
        """One page of samples in id order, filters AND-ed; ``next_after_id`` continues it."""
        with self.engine.connect() as conn:
            return sample_admin.list_samples(
                conn, from_id=from_id, to_id=to_id, batch_id=batch_id, ingest_key=ingest_key,
                quarantined=quarantined, after_id=after_id, limit=limit, features=features)

    def _sample_action(self, action: str, selection: SampleSelection, actor: str,
                       reason: str | None) -> SampleActionOutcome:
        with self.engine.begin() as conn:  # the change and its audit row commit together
            outcome = sample_admin.apply_action(conn, action, selection, actor, reason)
        what = selection.to_json() if selection.ids is None else f"{len(selection.ids)} ids"
        log.info("samples %s by %s: %d rows (%s; audit #%d)", action, actor, outcome.affected, what,
                 outcome.audit_id)
        return outcome

    def quarantine_samples(self, selection: SampleSelection, actor: str,
                           reason: str | None = None) -> SampleActionOutcome:
        """Keep the rows but leave them out of every retrain (and its holdout) from now on."""
        return self._sample_action("quarantine", selection, actor, reason)

    def release_samples(self, selection: SampleSelection, actor: str,
                        reason: str | None = None) -> SampleActionOutcome:
        """Undo a quarantine: the rows are used by the next retrain again."""
        return self._sample_action("release", selection, actor, reason)

    def delete_samples(self, selection: SampleSelection, actor: str, reason: str) -> SampleActionOutcome:
        """Delete the rows for good; their ingest batch row stays (a retried key stays a no-op)."""
        if not reason or not reason.strip():
            raise ValueError("reason: a delete needs a reason")
        return self._sample_action("delete", selection, actor, reason)

    def sample_audit(self, limit: int = 100, before_id: int | None = None) -> SampleAuditTrail:
        """The quarantine/release/delete trail, newest first (a page; ``next_before_id`` goes on)."""
        with self.engine.connect() as conn:
            return sample_admin.list_audit(conn, limit, before_id)


def _padded_fits(raw: list[bytes]) -> bool:
    """Padding every raw row to the longest costs at most 4× their size (plus 1 MiB)."""
    width = max(len(r) for r in raw)
    return width * len(raw) <= 4 * sum(map(len, raw)) + (1 << 20)
