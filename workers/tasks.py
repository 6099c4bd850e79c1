"""The retrain task: adopt the job's lock, run the shared retrain job, announce a promotion.

Idempotent per job id: a redelivered or duplicated message for a finished job does nothing,
and one whose lock is gone (expired, or another job runs now) marks itself failed instead of
training. The lock is checked again right before promotion (a fence), and promotion itself
is a compare-and-set on the active version in SQL, so a stale worker cannot overwrite a
newer promotion.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from app.distributed import (
    LockHeartbeat,
    RedisError,
    RetrainLock,
    cancel_key,
    publish_activated,
    redis_client,
)
from app.serving.retrain_job import run_retrain_job
from app.settings import get_settings
from app.storage import Store
from workers.celery_app import celery_app

log = logging.getLogger("skqk.worker")

FINISHED = ("succeeded", "failed")


@celery_app.task(name="workers.tasks.retrain", bind=True)
def retrain(self: Any, job_id: str, mode: str) -> dict[str, Any]:
    settings = get_settings()
    store = Store(settings.resolved_database_url)
    client = redis_client(settings.redis_url)
    lock = RetrainLock(client, settings.retrain_lease_s)
    try:
        job = store.get_job(job_id)
        if job is None:
            return {"skipped": f"unknown job {job_id}"}
        if job.status in FINISHED:
            return {"skipped": f"job already {job.status}"}  # duplicate or late redelivery
        if not lock.adopt(job_id):
            store.fail_job_if_unfinished(job_id, "worker lost: the retrain lock expired before this "
                                                 "delivery could run it")
            return {"skipped": "lock no longer held for this job"}
        lock.extend_to(settings.retrain_lease_s)

        def report(progress: dict[str, Any]) -> None:
            with contextlib.suppress(Exception):  # the result backend is best effort
                self.update_state(state="PROGRESS", meta=progress)

        with LockHeartbeat(lock, settings.retrain_lease_s) as beat:
            def should_cancel() -> bool:
                if beat.lost.is_set():
                    return True
                try:
                    return bool(client.exists(cancel_key(job_id)))
                except RedisError:
                    return False  # a Redis blip is no reason to throw away training

            try:
                result = run_retrain_job(store, settings, job_id, mode, should_cancel=should_cancel,
                                         on_progress=report, fence=lock.owned,
                                         actor=f"celery:{socket.gethostname()}")
            except SoftTimeLimitExceeded:
                log.error("retrain job %s hit the soft time limit", job_id)
                raise
        if result.get("promoted"):
            publish_activated(client, int(result["candidate_version"]))
        return result
    except Exception as exc:  # run_retrain_job records its own failures; this covers the rest
        store.fail_job_if_unfinished(job_id, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        with contextlib.suppress(RedisError):  # else the lock simply expires
            if lock.lock.local.token is not None and lock.owned():
                lock.release()
        store.dispose()
