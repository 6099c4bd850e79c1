"""The retrain task: own the job, run the shared retrain job, announce a promotion.

Idempotent per job id: the SQL job row decides. A delivery for a job that is not
``queued`` (a duplicate, a late redelivery, a cancelled job) does nothing, and of two
deliveries racing for one queued job only the one whose compare-and-set queued → running
wins trains. A delivery whose Redis lock belongs to another, unfinished job marks its job
failed instead of training.

While training, a heartbeat thread writes the job row's ``updated_at`` (API replicas judge
a job whose heartbeat is older than the lease dead) and extends the Redis lock, taking it
again if Redis lost it. Right before promotion the job checks it still owns both (a fence),
and promotion itself is a compare-and-set on the active version in SQL, so a stale worker
cannot overwrite a newer promotion.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from app.core.training import TrainingCancelled
from app.distributed import (
    WORKER_LOST_PREFIX,
    LockHeartbeat,
    RedisError,
    RetrainLock,
    publish_activated,
    redis_client,
)
from app.retrain.job import JobInterrupted, JobNotQueued, run_retrain_job
from app.retrain.sharded_features import SHARD_TASK, run_shard, sharded_pass
from app.serving.models import load_model
from app.settings import Settings, get_settings
from app.storage import Store
from workers.celery_app import apply_retrain_threads, celery_app

log = logging.getLogger("skqk.worker")


def _own_lock(lock: RetrainLock, store: Store, job_id: str, ttl_s: float) -> str | None:
    """Hold the lock for ``job_id``; None when held, else the other holder's id.

    Taken again when it is gone (expired, or Redis restarted without persistence: the SQL
    row says the job is still wanted) or left behind by a finished job.
    """
    if lock.adopt(job_id):
        return None
    holder = lock.holder()
    if holder is None and lock.acquire(job_id):
        log.warning("retrain lock for job %s was gone (Redis restarted or it expired); took it again",
                    job_id)
        return None
    other = store.get_job(holder) if holder else None
    if other is not None and other.finished and lock.replace(other.job_id, job_id, ttl_s):
        lock.adopt(job_id)
        return None
    return holder or "(nobody: it moved while we looked)"


def _alive(store: Store, job_id: str) -> Callable[[], bool]:
    """The SQL heartbeat: False only once an API replica judged the job lost (failed it)."""

    def beat() -> bool:
        if store.touch_job(job_id):
            return True
        job = store.get_job(job_id)  # queued (about to start), or it just ended here
        return job is not None and not (job.status == "failed"
                                        and (job.error or "").startswith(WORKER_LOST_PREFIX))

    return beat


def _pause_for_tests(settings: Settings, progress: dict[str, Any], stop: Callable[[], bool]) -> None:
    """The ``SKQK_RETRAIN_TEST_PAUSE_FILE`` knob: hold after an epoch while the file exists."""
    pause = settings.retrain_test_pause_file
    if pause is None or progress.get("phase") != "training" or "epoch" not in progress:
        return
    while pause.exists() and not stop():
        time.sleep(0.1)


@celery_app.task(name="workers.tasks.retrain", bind=True)
def retrain(self: Any, job_id: str, mode: str) -> dict[str, Any]:
    settings = get_settings()
    apply_retrain_threads()  # also under a pool that is not prefork (solo, threads)
    store = Store(settings.resolved_database_url)
    client = redis_client(settings.redis_url)
    lease = settings.retrain_lease_s
    lock = RetrainLock(client, lease)
    ran = False  # this delivery started the job: release its lock at the end
    try:
        job = store.get_job(job_id)
        if job is None:
            return {"skipped": f"unknown job {job_id}"}
        if job.status != "queued":  # duplicate, late redelivery or cancelled: the row decides
            log.info("retrain job %s is already %s: this delivery does nothing", job_id, job.status)
            return {"skipped": f"job already {job.status}"}
        other = _own_lock(lock, store, job_id, lease)
        if other is not None:
            store.fail_job_if_unfinished(job_id, f"worker lost: the retrain lock belongs to job {other} "
                                                 "now, so this delivery cannot run it")
            return {"skipped": "lock no longer held for this job"}
        lock.extend_to(lease)

        with LockHeartbeat(lock, lease, alive=_alive(store, job_id)) as beat:
            def cancel_requested() -> bool:
                try:
                    return store.cancel_requested(job_id)
                except Exception:
                    return False  # a store blip is no reason to throw away training

            def should_cancel() -> bool:  # a cancel request in the job row is read anyway
                if beat.lost.is_set():
                    raise JobInterrupted(f"this worker lost the job: {beat.reason}")
                return False

            def on_progress(progress: dict[str, Any]) -> None:
                with contextlib.suppress(Exception):  # the result backend is best effort
                    self.update_state(state="PROGRESS", meta=progress)
                _pause_for_tests(settings, progress, lambda: beat.lost.is_set() or cancel_requested())

            def fence() -> bool:  # right before promotion: is this job still ours?
                if beat.lost.is_set():
                    return False
                try:
                    return store.touch_job(job_id) and (lock.owned() or lock.reacquire())
                except Exception:
                    return False  # cannot prove it: do not promote

            try:
                ran = True
                shards = sharded_pass(settings.retrain_shards) if settings.retrain_shards > 1 else None
                result = run_retrain_job(store, settings, job_id, mode, should_cancel=should_cancel,
                                         on_progress=on_progress, fence=fence,
                                         actor=f"celery:{socket.gethostname()}", feature_pass=shards)
            except JobNotQueued as exc:  # another delivery won the start, or it was cancelled
                ran = exc.status not in ("queued", "running")  # a finished job's lock is garbage
                log.info("%s: this delivery does nothing", exc)
                return {"skipped": f"job already {exc.status}"}
            except TrainingCancelled as exc:  # logged and recorded by run_retrain_job
                return {"cancelled": str(exc)}
            except JobInterrupted as exc:  # likewise (a warning, no traceback)
                return {"interrupted": str(exc)}
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
        if ran:
            with contextlib.suppress(RedisError):  # else the lock simply expires
                lock.release_for(job_id)
        store.dispose()


@celery_app.task(name=SHARD_TASK)
def feature_shard(version: int, key: str, window: dict[str, Any], block_ids: int, audit_mark: int,
                  indices: list[int]) -> dict[str, Any]:
    """One shard of a QK retrain's feature pass (app.retrain.sharded_features): compute the
    blocks no other worker has, into the shared feature cache."""
    settings = get_settings()
    apply_retrain_threads()
    store = Store(settings.resolved_database_url)
    try:
        model, _record = load_model(store, version)
        done = run_shard(store, settings.resolved_feature_cache_dir, model, key, window, block_ids,
                         audit_mark, indices)
        log.info("feature shard of version %d: computed blocks %s of %s", version, done, indices)
        return {"worker": socket.gethostname(), "computed": done, "shard": indices}
    finally:
        store.dispose()
