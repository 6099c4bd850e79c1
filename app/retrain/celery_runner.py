"""Distributed retrain runner: jobs go to Celery workers over Redis (queue ``gpu``).

The SQL ``retrain_jobs`` row is the source of truth; Redis carries the message and the
single-flight lock (token = job id), and may lose either.

- ``submit`` refuses (409) while the SQL table shows a live job — queued and younger than
  ``SKQK_RETRAIN_QUEUE_TIMEOUT_S``, or running with a heartbeat fresher than
  ``SKQK_RETRAIN_LEASE_S`` — even when Redis lost the lock; refuses (503, naming the queue)
  when no worker consumes the queue (their heartbeats in Redis,
  :mod:`app.retrain.worker_presence`), rather than queueing a job nobody runs; then it takes
  the Redis lock, writes the row and sends the task. A lock whose token names a finished job
  is taken over.
- A supervisor thread in every API process (:meth:`CeleryRunner.sweep`) fails jobs that
  lost their worker (stale heartbeat, or never started within the queue timeout) and
  re-publishes a queued job whose message no worker started within
  ``SKQK_RETRAIN_REPUBLISH_S`` (a worker took it and died, or Redis restarted). The claim is
  a SQL compare-and-set, so one replica re-sends per interval; the worker starts a job by
  compare-and-set queued → running, so two deliveries never both train.
- ``status`` only reads the row. ``cancel`` of a queued job is a compare-and-set to
  ``cancelled`` plus the lock's release; a running job is asked to stop through its row.

Redis down → :class:`RetrainQueueUnavailable` (HTTP 503); serving and ingest never come here.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError

from app.distributed import (
    GPU_QUEUE,
    RETRAIN_TASK,
    WORKER_LOST_PREFIX,
    RedisError,
    RetrainLock,
    redis_client,
)
from app.retrain.protocol import RetrainInProgress, RetrainQueueUnavailable, check_mode, new_job_id
from app.retrain.worker_presence import PresenceCache
from app.settings import Settings
from app.storage import JobRecord, Store
from app.storage.store import UNFINISHED_JOB_STATUSES, utcnow

log = logging.getLogger("skqk.celery_runner")

WORKER_LOST = (WORKER_LOST_PREFIX + ": no heartbeat from its worker for over {lease:.0f}s "
               "(it died or lost its connection to the store)")
NEVER_STARTED = "no worker started it within {timeout:.0f}s (SKQK_RETRAIN_QUEUE_TIMEOUT_S)"
ABANDONED = "abandoned: its process went away (the retrain lock was free)"


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
        self.presence = PresenceCache(self.redis)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # supervisor passes: a few per interval (one small SELECT each), at most 5 s apart
        short = min(settings.retrain_republish_s, settings.retrain_lease_s)
        self.sweep_interval_s = min(max(short / 6, 0.2), 5.0)

    # ---- the RetrainRunner protocol ---------------------------------------------------------
    def submit(self, mode: str) -> str:
        check_mode(mode)
        job_id = new_job_id()
        live = self._live_job(holding_lock=False)  # SQL first: Redis may have lost a live job's lock
        if live is not None:
            raise RetrainInProgress(live.job_id)
        self._require_worker()
        try:
            if not self._take_lock(job_id):
                raise RetrainInProgress(self.lock.holder())
        except RedisError as exc:
            raise RetrainQueueUnavailable(f"Redis is unreachable ({type(exc).__name__}: {exc})") from None
        try:
            live = self._live_job(holding_lock=True)
            if live is not None:
                self._release_lock(job_id)
                raise RetrainInProgress(live.job_id)
            self.store.create_job(job_id, mode, runner=self.name,
                                  progress={"delivery": {"published": 1, "republished": 0}})
            self._send(job_id, mode, self.settings.retrain_queue_timeout_s)
        except RetrainInProgress:
            raise
        except (RedisError, KombuOperationalError, OSError) as exc:
            self.store.fail_job_if_unfinished(job_id, f"could not enqueue: {exc}")
            self._release_lock(job_id)
            raise RetrainQueueUnavailable(f"could not enqueue the retrain job ({exc})") from None
        except Exception:
            self._release_lock(job_id)
            raise
        return job_id

    def status(self, job_id: str) -> JobRecord | None:
        """The job row as it is: reading never changes a job (its owner decides)."""
        return self.store.get_job(job_id)

    def workers_online(self) -> int | None:
        """Workers consuming the queue (remembered 2 s: status reads poll); None: Redis is away."""
        return self.presence.get(GPU_QUEUE)

    def _require_worker(self) -> None:
        """503 rather than a job that waits out the queue timeout holding the retrain lock."""
        online = self.presence.get(GPU_QUEUE, fresh=True)
        if online == 0:  # (None: Redis cannot say; taking the lock next reports that)
            raise RetrainQueueUnavailable(
                f"no worker consumes queue {GPU_QUEUE!r}: none has sent a heartbeat within "
                f"SKQK_RETRAIN_WORKER_TTL_S={self.settings.retrain_worker_ttl_s:g}s; start one "
                f"(skqk worker --queues {GPU_QUEUE})")

    def cancel(self, job_id: str) -> str | None:
        """``cancelled`` at once for a queued job; ``cancelling`` for a running one; else None."""
        if self.store.cancel_queued_job(job_id):
            self._release_lock(job_id)
            log.info("retrain job %s cancelled before a worker started it", job_id)
            return "cancelled"
        if self.store.request_cancel(job_id):  # the worker reads it between epochs
            return "cancelling"
        return None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.celery.close()

    # ---- supervision: lost workers and lost messages ----------------------------------------
    def start(self) -> None:
        """Run :meth:`sweep` in a background thread until :meth:`close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._supervise, name="retrain-supervisor",
                                            daemon=True)
            self._thread.start()

    def _supervise(self) -> None:
        last_error = ""
        while not self._stop.wait(self.sweep_interval_s):
            try:
                self.sweep()
                last_error = ""
            except Exception as exc:  # store or Redis down: say so once, keep trying
                if str(exc) != last_error:
                    log.warning("retrain supervisor: %s: %s", type(exc).__name__, exc)
                last_error = str(exc)

    def sweep(self) -> None:
        """Fail distributed jobs that lost their worker; re-publish queued ones whose message was lost."""
        now = utcnow()
        due = now - timedelta(seconds=self.settings.retrain_republish_s)
        seen = now - timedelta(seconds=self.sweep_interval_s)
        for job in self.store.list_jobs(UNFINISHED_JOB_STATUSES, limit=100):
            if job.runner != self.name:
                continue  # a CLI job keeps its own lease
            if not self._settle(job) or job.status != "queued" or job.updated_at is None:
                continue
            try:
                if self._message_waiting(job.job_id):
                    # No worker has taken it yet (none is free): nothing was lost. Keep its clock
                    # current, so the worker that takes it gets the whole interval to start it.
                    if job.updated_at < seen:
                        self.store.claim_queued_job(job.job_id, seen)
                elif job.updated_at < due:
                    self._republish(job)
            except (RedisError, KombuOperationalError, OSError) as exc:  # try again next pass
                log.debug("cannot re-publish retrain job %s now: %s", job.job_id, exc)

    def _settle(self, job: JobRecord) -> bool:
        """True while ``job`` is alive; a dead one is failed (compare-and-set) and its lock freed."""
        now = utcnow()
        s = self.settings
        if job.status == "running":
            stale = now - timedelta(seconds=s.retrain_lease_s)
            if job.updated_at is None or job.updated_at >= stale:
                return True
            error = WORKER_LOST.format(lease=s.retrain_lease_s)
            if not self.store.fail_stale_job(job.job_id, "running", error, updated_before=stale):
                return True  # a heartbeat landed meanwhile
        else:
            expired = now - timedelta(seconds=s.retrain_queue_timeout_s)
            if job.created_at is None or job.created_at >= expired:
                return True
            error = NEVER_STARTED.format(timeout=s.retrain_queue_timeout_s)
            if not self.store.fail_stale_job(job.job_id, "queued", error, created_before=expired):
                return True  # a worker started it meanwhile
        log.warning("retrain job %s failed: %s", job.job_id, error)
        self._release_lock(job.job_id)
        return False

    def _live_job(self, holding_lock: bool) -> JobRecord | None:
        """A queued or running job that is still alive (dead ones are failed on the way)."""
        live = None
        for job in self.store.list_jobs(UNFINISHED_JOB_STATUSES, limit=100):
            if job.runner != self.name:
                # another runner (the CLI) holds the Redis lock while it runs: free lock → gone
                if holding_lock:
                    self.store.fail_job_if_unfinished(job.job_id, ABANDONED)
                continue
            if self._settle(job) and live is None:
                live = job
        return live

    def _republish(self, job: JobRecord) -> None:
        cutoff = utcnow() - timedelta(seconds=self.settings.retrain_republish_s)
        if not self._take_lock(job.job_id):
            return  # another job holds the lock right now; try again next time
        delivery = dict(job.progress.get("delivery") or {})
        delivery["published"] = int(delivery.get("published", 1)) + 1
        delivery["republished"] = int(delivery.get("republished", 0)) + 1
        if not self.store.claim_queued_job(job.job_id, cutoff, {**job.progress, "delivery": delivery}):
            return  # another replica re-sent it for this interval, or a worker started it
        assert job.created_at is not None
        left = self.settings.retrain_queue_timeout_s - (utcnow() - job.created_at).total_seconds()
        self._send(job.job_id, job.mode, max(left, 1.0))
        log.info("re-published retrain job %s (publication %d): no worker started it within %.0fs",
                 job.job_id, delivery["published"], self.settings.retrain_republish_s)

    def _message_waiting(self, job_id: str) -> bool:
        """Is the job's message still in the broker queue (no worker has taken it)?"""
        return any(job_id in message for message in self.redis.lrange(GPU_QUEUE, 0, -1))

    # ---- the Redis lock and the broker ------------------------------------------------------
    def _take_lock(self, job_id: str) -> bool:
        """Hold the lock for ``job_id``: free, already ours, or left behind by a finished job."""
        if self.lock.acquire(job_id):
            return True
        holder = self.lock.holder()
        if holder == job_id:
            return True
        if holder is None:
            return self.lock.acquire(job_id)
        other = self.store.get_job(holder)
        return (other is not None and other.finished
                and self.lock.replace(holder, job_id, self.settings.retrain_queue_timeout_s))

    def _release_lock(self, job_id: str) -> None:
        try:
            self.lock.release_for(job_id)
        except RedisError as exc:  # it expires; a finished job's lock is taken over anyway
            log.warning("could not release the retrain lock of job %s: %s", job_id, exc)

    def _send(self, job_id: str, mode: str, expires_s: float) -> None:
        self.celery.send_task(RETRAIN_TASK, args=[job_id, mode], task_id=job_id, queue=GPU_QUEUE,
                              expires=expires_s, retry=True,
                              retry_policy={"max_retries": 2, "interval_start": 0,
                                            "interval_step": 0.5, "interval_max": 1})
