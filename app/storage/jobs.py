"""Retrain jobs (the source of truth for their status) and leases (single-flight across
processes)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, insert, select, update

from app.storage.base import as_utc, clean_json, utcnow
from app.storage.schema import JOB_STATUSES, leases, retrain_jobs

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


class JobRepository:
    """Store methods for jobs and leases (mixed into :class:`app.storage.store.Store`)."""

    engine: Engine

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


