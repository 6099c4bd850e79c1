"""Retrain numbers for ``/metrics``, read from the SQL job table (the source of truth), so every
replica exports the same whichever process or worker ran the job.

Three small queries on one connection (the job table holds one row per retrain, so a few
thousand rows after years): jobs grouped by the mode that ran and the outcome, and the
latest finished and the latest created job. The caller bounds them (``_store_gauges`` in
``app.api.main``: a call timeout, and /metrics waits ``SKQK_STORE_HEALTH_TIMEOUT_S``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select

from app.storage import Store
from app.storage.schema import retrain_jobs
from app.storage.store import as_utc, utcnow

OUTCOMES = ("queued", "running", "promoted", "rejected", "failed", "cancelled")


@dataclass
class RetrainStats:
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (mode, outcome) → jobs
    last_success_ts: float | None = None  # latest job that ran to the end (promoted or rejected)
    last_failure_ts: float | None = None
    last_duration_s: float | None = None  # of the latest finished job that had started
    last_queue_wait_s: float | None = None  # of the latest job (still queued: so far)


def _ts(value: datetime | None) -> float | None:
    value = as_utc(value)
    return value.timestamp() if value is not None else None


def _outcome(status: str, promoted: object) -> str:
    if status != "succeeded":
        return status
    return "promoted" if promoted in (True, 1, "true", "1") else "rejected"


def retrain_stats(store: Store) -> RetrainStats:
    j = retrain_jobs.c
    # the mode that ran: the result's (auto resolved), else the progress's (chosen, not ended)
    mode = func.coalesce(j.result["mode"].as_string(), j.progress["mode"].as_string(), j.mode)
    promoted = j.result["promoted"].as_string()  # 'true'/'false' on PostgreSQL, 1/0 on SQLite
    grouped = (select(mode, j.status, promoted, func.count(), func.max(j.finished_at))
               .group_by(mode, j.status, promoted))
    last_done = (select(j.started_at, j.finished_at)
                 .where(j.finished_at.is_not(None), j.started_at.is_not(None))
                 .order_by(j.finished_at.desc()).limit(1))
    last_made = select(j.created_at, j.started_at, j.finished_at).order_by(j.created_at.desc()).limit(1)
    stats = RetrainStats()
    with store.engine.connect() as conn:
        for ran, status, done, n, finished in conn.execute(grouped):
            key = (str(ran), _outcome(status, done))
            stats.jobs[key] = stats.jobs.get(key, 0) + int(n)
            ts = _ts(finished)
            if status == "succeeded" and ts is not None:
                stats.last_success_ts = max(stats.last_success_ts or 0.0, ts)
            elif status == "failed" and ts is not None:
                stats.last_failure_ts = max(stats.last_failure_ts or 0.0, ts)
        done_row = conn.execute(last_done).first()
        made_row = conn.execute(last_made).first()
    if done_row is not None:
        stats.last_duration_s = (as_utc(done_row[1]) - as_utc(done_row[0])).total_seconds()  # type: ignore[operator]
    if made_row is not None:
        created, started, finished = (as_utc(v) for v in made_row)
        until = started or finished or utcnow()
        stats.last_queue_wait_s = max((until - created).total_seconds(), 0.0)  # type: ignore[operator]
    return stats
