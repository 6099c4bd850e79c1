"""Distributed retrain runner: jobs go to Celery workers over Redis (queue ``gpu``).

Single flight across every replica is a Redis lock whose token is the job id: the API takes
it when it enqueues, the worker adopts and extends it while training (see
:mod:`app.distributed`). Job status lives in the SQL ``retrain_jobs`` row, which the worker
updates; a job whose lock vanished while it was still queued/running lost its worker and is
marked failed with that reason. Redis down → :class:`RetrainQueueUnavailable` (HTTP 503);
serving and ingest never come here.
"""

from __future__ import annotations

import logging

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError

from app.distributed import (
    GPU_QUEUE,
    RETRAIN_TASK,
    RedisError,
    RetrainLock,
    cancel_key,
    redis_client,
)
from app.serving.runner import RetrainInProgress, RetrainQueueUnavailable, check_mode, new_job_id
from app.settings import Settings
from app.storage import JobRecord, Store

log = logging.getLogger("skqk.celery_runner")

WORKER_LOST = ("worker lost: the retrain lock expired while the job was {status} "
               "(the worker died or never started it)")


def producer_app(redis_url: str) -> Celery:
    """A Celery app used only to send tasks (the worker side is workers/celery_app.py)."""
    app = Celery("skqk-api", broker=redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"], broker_connection_timeout=2,
                    broker_connection_retry_on_startup=False,
                    task_routes={RETRAIN_TASK: {"queue": GPU_QUEUE}})
    return app


class CeleryRunner:
    name = "celery"

    def __init__(self, store: Store, settings: Settings) -> None:
        if not settings.redis_url:
            raise ValueError("CeleryRunner needs SKQK_REDIS_URL")
        self.store = store
        self.settings = settings
        self.redis = redis_client(settings.redis_url)
        # While queued the lock lives for the queue timeout; the worker shortens it to the lease.
        self.lock = RetrainLock(self.redis, settings.retrain_queue_timeout_s)
        self.celery = producer_app(settings.redis_url)

    def submit(self, mode: str) -> str:
        check_mode(mode)
        job_id = new_job_id()
        try:
            if not self.lock.acquire(job_id):
                raise RetrainInProgress(self.lock.holder())
        except RedisError as exc:
            raise RetrainQueueUnavailable(f"Redis is unreachable ({type(exc).__name__}: {exc})") from None
        try:
            self._fail_abandoned_jobs()
            self.store.create_job(job_id, mode, runner=self.name)
            self.celery.send_task(RETRAIN_TASK, args=[job_id, mode], task_id=job_id, queue=GPU_QUEUE,
                                  expires=self.settings.retrain_queue_timeout_s, retry=True,
                                  retry_policy={"max_retries": 2, "interval_start": 0,
                                                "interval_step": 0.5, "interval_max": 1})
        except (RedisError, KombuOperationalError, OSError) as exc:
            self.store.fail_job_if_unfinished(job_id, f"could not enqueue: {exc}")
            self.lock.release()
            raise RetrainQueueUnavailable(f"could not enqueue the retrain job ({exc})") from None
        except Exception:
            self.lock.release()
            raise
        return job_id

    def status(self, job_id: str) -> JobRecord | None:
        job = self.store.get_job(job_id)
        if job is None or job.status not in ("queued", "running"):
            return job
        try:
            holder = self.lock.holder()
        except RedisError:
            return job  # cannot tell; report what the store says
        if holder != job_id:
            # Re-read after the lock: a worker marks its job finished *before* releasing it.
            self.store.fail_job_if_unfinished(job_id, WORKER_LOST.format(status=job.status))
            job = self.store.get_job(job_id)
        return job

    def cancel(self, job_id: str) -> bool:
        """Ask the worker to stop between epochs; False if the job is not running."""
        job = self.store.get_job(job_id)
        if job is None or job.status not in ("queued", "running"):
            return False
        try:
            self.redis.set(cancel_key(job_id), "1", ex=self.settings.retrain_time_limit_s)
        except RedisError as exc:
            raise RetrainQueueUnavailable(f"Redis is unreachable ({exc})") from None
        return True

    def _fail_abandoned_jobs(self) -> None:
        """We hold the lock, so any other queued/running job lost its worker."""
        for job in self.store.list_jobs(("queued", "running"), limit=100):
            self.store.fail_job_if_unfinished(job.job_id, WORKER_LOST.format(status=job.status))

    def close(self) -> None:
        self.celery.close()
