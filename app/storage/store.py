"""The SQL store: samples, model versions (weights as safetensors bytes), promotions, jobs.

One class over a SQLAlchemy engine; nothing SQLite-specific beyond connection pragmas, so
the same code runs on ``postgresql+psycopg://…``. The store deals in bytes and numpy
arrays; turning weights into torch modules is the serving layer's job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, create_engine, event, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from app.storage import sample_admin
from app.storage.guard import LIBPQ_DRIVERS, StoreTimeouts, install_guard, libpq_connect_args
from app.storage.sample_admin import (
    SampleActionOutcome,
    SampleAuditTrail,
    SampleListing,
    SampleSelection,
)
from app.storage.schema import (
    JOB_STATUSES,
    LEASE_NAMES,
    active_model,
    ingest_batches,
    leases,
    model_versions,
    promotions,
    retrain_jobs,
    sample_audit,
    sample_counts,
    samples,
)

log = logging.getLogger("skqk.storage")


class UnknownVersion(LookupError):
    def __init__(self, version: int) -> None:
        super().__init__(f"model version {version} does not exist")
        self.version = version


class IdempotencyConflict(ValueError):
    """The idempotency key was already used for a different payload."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)  # SQLite hands back naive datetimes


def clean_json(value: Any) -> Any:
    """JSON-safe copy: non-finite floats → None (Postgres json rejects NaN/Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.generic):
        return clean_json(value.item())
    return value


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


UNFINISHED_JOB_STATUSES = ("queued", "running")
FINISHED_JOB_STATUSES = tuple(s for s in JOB_STATUSES if s not in UNFINISHED_JOB_STATUSES)
CANCEL_REQUESTED = "cancel requested"  # a running job's ``error`` while a cancel is pending


@dataclass
class JobRecord:
    job_id: str
    mode: str
    status: str
    runner: str
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        def iso(d: datetime | None) -> str | None:
            return d.isoformat() if d else None

        return {"job_id": self.job_id, "status": self.status, "mode": self.mode,
                "runner": self.runner, "progress": self.progress, "result": self.result or {},
                "error": self.error, "created_at": iso(self.created_at),
                "started_at": iso(self.started_at), "finished_at": iso(self.finished_at),
                "updated_at": iso(self.updated_at)}  # a running job's last heartbeat

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_JOB_STATUSES


@dataclass
class Promotion:
    version: int
    previous_version: int | None
    actor: str
    reason: str
    at: datetime


def make_engine(url: str, timeouts: StoreTimeouts | None = None) -> Engine:
    """An engine with sane settings per backend (SQLite: WAL, fsync on commit, busy wait; libpq:
    connect/statement/pool timeouts, TCP keepalives and the call-timeout guard of app.storage.guard).

    ``timeouts`` default to the ``SKQK_DB_*`` / ``SKQK_STORE_TIMEOUT_S`` settings.
    """
    t = timeouts or StoreTimeouts.from_settings()
    if url.startswith("sqlite"):
        parsed = make_url(url)
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        busy_s = t.statement_s if t.statement_s > 0 else 86_400.0  # 0: wait (practically) forever
        # a file gets a QueuePool (with a timeout); in memory, SQLAlchemy uses a one-connection pool
        in_memory = not database or database == ":memory:" or parsed.query.get("mode") == "memory"
        pool = {} if in_memory else {"pool_timeout": t.pool_s}
        engine = create_engine(url, **pool, connect_args={"timeout": busy_s, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # a committed ingest survives power loss too
            cur.execute(f"PRAGMA busy_timeout={int(busy_s * 1000)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    parsed = make_url(url)
    if parsed.get_driver_name() in LIBPQ_DRIVERS:
        engine = create_engine(url, pool_size=5, max_overflow=10, pool_timeout=t.pool_s,
                               connect_args=libpq_connect_args(parsed, t))
        install_guard(engine, t)  # pings on checkout itself, within the call timeout
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, pool_timeout=t.pool_s)


class Store:
    def __init__(self, url: str, engine: Engine | None = None, timeouts: StoreTimeouts | None = None) -> None:
        self.url = url
        self.timeouts = timeouts or StoreTimeouts.from_settings()  # call_s: what serving callers wait
        self.engine = engine or make_engine(url, self.timeouts)

    @property
    def _insert_samples_sql(self) -> str:
        style = self.engine.dialect.paramstyle
        marks = {"qmark": "?, ?, ?, ?, ?", "format": "%s, %s, %s, %s, %s", "pyformat": "%s, %s, %s, %s, %s",
                 "numeric": ":1, :2, :3, :4, :5"}.get(style)
        if marks is None:
            raise NotImplementedError(f"driver paramstyle {style!r}")
        return (f"INSERT INTO {samples.name} (batch_id, n_features, features, label, targets) "
                f"VALUES ({marks})")

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def dispose(self) -> None:
        self.engine.dispose()

    # ---- schema --------------------------------------------------------------------------
    def create_schema(self) -> None:
        """Upgrade the schema to the newest revision, then insert the singleton rows.

        Safe to run from several processes: the upgrade is serialised by a lock (see
        app.storage.migrate) and the singleton inserts ignore rows that already exist.
        """
        from app.storage.migrate import upgrade_to_head  # alembic only where schemas change

        upgrade_to_head(self.engine)
        self._insert_ignore(active_model, [{"id": 1, "version": None, "updated_at": None}])
        self._insert_ignore(leases, [{"name": n, "holder": None, "expires_at": None} for n in LEASE_NAMES])

    def _insert_ignore(self, table: Any, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(table).values(**row))
            except IntegrityError:
                pass

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

    # ---- model versions --------------------------------------------------------------------
    def register_version(self, architecture: dict[str, Any], selector_weights: bytes,
                         estimator_weights: bytes, mode: str, parent: int | None,
                         metrics: dict[str, Any], data_watermark: int | None = None,
                         job_id: str | None = None, feature_schema: dict[str, Any] | None = None) -> int:
        if mode not in ("qk", "full", "import"):  # import: a network trained elsewhere
            raise ValueError(f"mode must be qk, full or import, got {mode!r}")
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

    # ---- retrain jobs ------------------------------------------------------------------------
    def create_job(self, job_id: str, mode: str, runner: str,
                   progress: dict[str, Any] | None = None) -> JobRecord:
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(insert(retrain_jobs).values(
                job_id=job_id, mode=mode, status="queued", runner=runner,
                progress=clean_json(progress or {}), result=None, error=None, created_at=now,
                updated_at=now))
        job = self.get_job(job_id)
        assert job is not None
        return job

    def update_job(self, job_id: str, **values: Any) -> None:
        if "status" in values and values["status"] not in JOB_STATUSES:
            raise ValueError(f"bad job status {values['status']!r}")
        for key in ("progress", "result"):
            if key in values and values[key] is not None:
                values[key] = clean_json(values[key])
        values["updated_at"] = utcnow()
        with self.engine.begin() as conn:
            conn.execute(update(retrain_jobs).where(retrain_jobs.c.job_id == job_id).values(**values))

    def _cas_job(self, job_id: str, status: str | Iterable[str], values: dict[str, Any],
                 *conditions: Any) -> bool:
        """UPDATE the job only while its status is ``status`` (and ``conditions`` hold)."""
        expected = (status,) if isinstance(status, str) else tuple(status)
        for key in ("progress", "result"):
            if values.get(key) is not None:
                values[key] = clean_json(values[key])
        with self.engine.begin() as conn:
            res = conn.execute(update(retrain_jobs).where(
                retrain_jobs.c.job_id == job_id, retrain_jobs.c.status.in_(expected), *conditions)
                .values(**values, updated_at=utcnow()))
            return res.rowcount == 1

    def start_job(self, job_id: str) -> JobRecord | None:
        """Compare-and-set queued → running: of several deliveries of one job, one trains.

        None (nothing changed) when the job is no longer queued: another delivery runs it,
        or it was cancelled or failed meanwhile; the caller must then not train.
        """
        if not self._cas_job(job_id, "queued", {"status": "running", "started_at": utcnow()}):
            return None
        return self.get_job(job_id)

    def finish_job(self, job_id: str, status: str, *, expect: str | Iterable[str] = "running",
                   error: str | None = None, result: dict[str, Any] | None = None,
                   progress: dict[str, Any] | None = None) -> bool:
        """Compare-and-set a job from ``expect`` to the final ``status``; False: no change.

        A worker judged dead (its row already ``failed``) cannot turn it ``succeeded`` later.
        """
        if status not in FINISHED_JOB_STATUSES:
            raise ValueError(f"not a final job status: {status!r}")
        values: dict[str, Any] = {"status": status, "error": error, "finished_at": utcnow()}
        if result is not None:
            values["result"] = result
        if progress is not None:
            values["progress"] = progress
        return self._cas_job(job_id, expect, values)

    def cancel_queued_job(self, job_id: str) -> bool:
        """queued → cancelled at once (no worker started it); False when not queued."""
        return self.finish_job(job_id, "cancelled", expect="queued",
                               error="cancelled by request before a worker started it")

    def request_cancel(self, job_id: str) -> bool:
        """Ask a running job to stop between epochs (its runner polls :meth:`cancel_requested`,
        whichever process runs it); shown as its ``error`` until it ends. False: not running."""
        with self.engine.begin() as conn:  # not a sign of life: ``updated_at`` stays
            res = conn.execute(update(retrain_jobs).where(
                retrain_jobs.c.job_id == job_id, retrain_jobs.c.status == "running")
                .values(error=CANCEL_REQUESTED))
            return res.rowcount == 1

    def cancel_requested(self, job_id: str) -> bool:
        with self.engine.connect() as conn:
            error = conn.execute(select(retrain_jobs.c.error).where(
                retrain_jobs.c.job_id == job_id, retrain_jobs.c.status == "running")).scalar()
        return error == CANCEL_REQUESTED

    def touch_job(self, job_id: str) -> bool:
        """A running job's heartbeat (``updated_at``); False once the row is not running."""
        return self._cas_job(job_id, "running", {})

    def fail_stale_job(self, job_id: str, status: str, error: str, *,
                       updated_before: datetime | None = None,
                       created_before: datetime | None = None) -> bool:
        """``status`` → failed, only if the row showed no sign of life since the cutoff(s)."""
        conditions = []
        if updated_before is not None:
            conditions.append(retrain_jobs.c.updated_at < updated_before)
        if created_before is not None:
            conditions.append(retrain_jobs.c.created_at < created_before)
        return self._cas_job(job_id, status, {"status": "failed", "error": error,
                                              "finished_at": utcnow()}, *conditions)

    def claim_queued_job(self, job_id: str, updated_before: datetime,
                         progress: dict[str, Any] | None = None) -> bool:
        """Restart a queued job's publish clock (``updated_at``) unless someone did since the
        cutoff: of several replicas racing to re-publish it in one interval, one wins.
        ``progress`` (the delivery counts) is stored with it."""
        values = {} if progress is None else {"progress": progress}
        return self._cas_job(job_id, "queued", values, retrain_jobs.c.updated_at < updated_before)

    def fail_job_if_unfinished(self, job_id: str, error: str) -> bool:
        """Mark a queued/running job failed; a no-op (False) once it has finished."""
        return self._cas_job(job_id, UNFINISHED_JOB_STATUSES,
                             {"status": "failed", "error": error, "finished_at": utcnow()})

    @staticmethod
    def _job(row: Any) -> JobRecord:
        return JobRecord(job_id=row["job_id"], mode=row["mode"], status=row["status"],
                         runner=row["runner"], progress=row["progress"] or {}, result=row["result"],
                         error=row["error"], created_at=as_utc(row["created_at"]),
                         started_at=as_utc(row["started_at"]), finished_at=as_utc(row["finished_at"]),
                         updated_at=as_utc(row["updated_at"]))

    def get_job(self, job_id: str) -> JobRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(retrain_jobs).where(retrain_jobs.c.job_id == job_id)).mappings().first()
        return self._job(row) if row else None

    def list_jobs(self, statuses: Iterable[str] | None = None, limit: int = 100) -> list[JobRecord]:
        query = select(retrain_jobs).order_by(retrain_jobs.c.created_at.desc()).limit(limit)
        if statuses is not None:
            query = query.where(retrain_jobs.c.status.in_(list(statuses)))
        with self.engine.connect() as conn:
            return [self._job(r) for r in conn.execute(query).mappings()]

    def fail_orphaned_jobs(self, lease: str = "retrain") -> list[str]:
        """Mark queued/running jobs failed when nobody holds the lease for them any more."""
        holder = self.lease_holder(lease)
        orphans = [j.job_id for j in self.list_jobs(("queued", "running"), limit=1000)
                   if j.job_id != holder]
        for job_id in orphans:
            self.update_job(job_id, status="failed", finished_at=utcnow(),
                            error="interrupted: the process running it went away")
        return orphans

    # ---- leases (single-flight across processes) --------------------------------------------
    def try_acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        now = time.time()
        with self.engine.begin() as conn:
            res = conn.execute(update(leases).where(
                leases.c.name == name,
                (leases.c.holder.is_(None)) | (leases.c.expires_at < now) | (leases.c.holder == holder),
            ).values(holder=holder, expires_at=now + ttl_s))
            return res.rowcount == 1

    def take_over_lease(self, name: str, old_holder: str, holder: str, ttl_s: float) -> bool:
        """Compare-and-set the lease from ``old_holder`` (known to be finished) to ``holder``."""
        with self.engine.begin() as conn:
            res = conn.execute(update(leases).where(leases.c.name == name, leases.c.holder == old_holder)
                               .values(holder=holder, expires_at=time.time() + ttl_s))
            return res.rowcount == 1

    def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        with self.engine.begin() as conn:
            res = conn.execute(update(leases).where(leases.c.name == name, leases.c.holder == holder)
                               .values(expires_at=time.time() + ttl_s))
            return res.rowcount == 1

    def release_lease(self, name: str, holder: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(leases).where(leases.c.name == name, leases.c.holder == holder)
                         .values(holder=None, expires_at=None))

    def lease_holder(self, name: str) -> str | None:
        """The current holder, or None when free or expired."""
        with self.engine.connect() as conn:
            row = conn.execute(select(leases.c.holder, leases.c.expires_at)
                               .where(leases.c.name == name)).first()
        if row is None or row[0] is None or (row[1] is not None and row[1] < time.time()):
            return None
        return str(row[0])


def _padded_fits(raw: list[bytes]) -> bool:
    """Padding every raw row to the longest costs at most 4× their size (plus 1 MiB)."""
    width = max(len(r) for r in raw)
    return width * len(raw) <= 4 * sum(map(len, raw)) + (1 << 20)


def open_store(url: str, create: bool = True) -> Store:
    store = Store(url)
    if create:
        store.create_schema()
    return store
