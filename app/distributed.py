"""What API replicas and Celery workers agree on over Redis: names, the lock, notifications.

Redis carries work and notifications only; the SQL store stays the source of truth. Every
call here uses short socket timeouts so a Redis outage turns into a quick, clear error
(→ 503 on /retrain) instead of a hung request, and never touches serving or ingest.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import cache

import redis
from redis.exceptions import LockError, LockNotOwnedError
from redis.exceptions import RedisError as RedisError  # re-exported for callers

log = logging.getLogger(__name__)

RETRAIN_TASK = "workers.tasks.retrain"
GPU_QUEUE = "gpu"
LOCK_NAME = "skqk:retrain:lock"
ACTIVATED_CHANNEL = "skqk:model-activated"
WORKER_LOST_PREFIX = "worker lost"  # how a job judged dead by an API replica's supervisor is failed


@cache
def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                health_check_interval=15, decode_responses=True)


# Compare-and-delete / compare-and-set on the lock's token, atomically in Redis.
_RELEASE_IF = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_REPLACE_IF = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
               "return redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) and 1 end return 0")


class RetrainLock:
    """Deployment-wide single flight: a redis-py Lock whose token is the running job's id.

    The API takes it when it enqueues a job (so a second POST /retrain sees the holder), the
    worker adopts it by token, extends it while training and releases it at the end. A dead
    worker stops extending, so the lock expires after ``timeout_s`` at worst. Redis may also
    lose it (a restart without persistence): the SQL job row stays the source of truth, and
    the owner of a live job simply takes it again (:meth:`reacquire`).
    """

    def __init__(self, client: redis.Redis, timeout_s: float) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.lock = client.lock(LOCK_NAME, timeout=timeout_s, blocking=False, thread_local=False)

    def acquire(self, job_id: str) -> bool:
        return bool(self.lock.acquire(blocking=False, token=job_id))

    def holder(self) -> str | None:
        return self.client.get(LOCK_NAME)

    def adopt(self, job_id: str) -> bool:
        """Take over a lock acquired by the API for ``job_id``; False if someone else holds it."""
        self.lock.local.token = job_id.encode()
        return self.lock.owned()

    def reacquire(self) -> bool:
        """Take the lock again with our token if nobody holds it (Redis lost it)."""
        token = self.lock.local.token
        return token is not None and self.acquire(token.decode())

    def owned(self) -> bool:
        """Still ours? (Used as the fence right before promotion.)"""
        try:
            return bool(self.lock.owned())
        except redis.RedisError:
            return False  # cannot prove ownership: do not promote

    def extend_to(self, seconds: float) -> None:
        self.lock.extend(seconds, replace_ttl=True)

    def release(self) -> None:
        try:
            self.lock.release()
        except LockError:  # expired or taken over: nothing of ours to release
            log.warning("retrain lock was no longer ours at release")

    def release_for(self, job_id: str) -> bool:
        """Release the lock only if ``job_id`` holds it (a cancelled or dead job's lock)."""
        return bool(self.client.eval(_RELEASE_IF, 1, LOCK_NAME, job_id))

    def replace(self, old_job_id: str, job_id: str, ttl_s: float) -> bool:
        """Hand the lock from ``old_job_id`` (known to be finished) to ``job_id``."""
        return bool(self.client.eval(_REPLACE_IF, 1, LOCK_NAME, old_job_id, job_id, int(ttl_s * 1000)))


class LockHeartbeat:
    """Keeps extending a lock from a background thread; takes it again when Redis lost it.

    ``alive`` (optional) is called on every beat as well: a worker passes its SQL job-row
    heartbeat, which answers False once the row no longer says ``running`` (the job was
    judged lost): then ``lost`` is set. With such a check the SQL row is the authority and a
    lock held by someone else is retried on the next beat (a new POST /retrain that sees this
    job's fresh heartbeat backs off); without one, that sets ``lost`` at once.
    """

    def __init__(self, lock: RetrainLock, ttl_s: float, alive: Callable[[], bool] | None = None) -> None:
        self.lock, self.ttl_s, self.alive = lock, ttl_s, alive
        self.lost = threading.Event()
        self.reason = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retrain-lock-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3) and not self.lost.is_set():
            if self.alive is not None:
                self._check_alive()
            self._extend()

    def _check_alive(self) -> None:
        try:
            if not self.alive():  # type: ignore[misc]
                self._lose("the job row is no longer running (it was judged lost or finished)")
        except Exception as exc:  # the store is down: the lease gives us time to retry
            log.warning("could not write the job heartbeat: %s", exc)

    def _extend(self) -> None:
        try:
            self.lock.extend_to(self.ttl_s)
        except LockNotOwnedError:
            self._retake()
        except redis.RedisError as exc:  # transient: the TTL gives us time to retry
            log.warning("could not extend retrain lock: %s", exc)

    def _retake(self) -> None:
        try:
            if self.lock.reacquire():
                log.warning("the retrain lock had vanished (Redis restarted?); took it again")
                return
            holder = self.lock.holder()
        except redis.RedisError as exc:
            log.warning("could not take the retrain lock again: %s", exc)
            return
        if self.alive is None:
            self._lose(f"another job owns the retrain lock now ({holder})")
        else:
            log.warning("the retrain lock is held by %s; this job's row still says running, "
                        "retrying", holder)

    def _lose(self, reason: str) -> None:
        self.reason = reason
        log.warning("retrain lock lost: %s; stopping this job", reason)
        self.lost.set()

    def __enter__(self) -> LockHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def publish_activated(client: redis.Redis, version: int) -> None:
    """Fire-and-forget: replicas that miss it catch up through their poll."""
    try:
        client.publish(ACTIVATED_CHANNEL, str(version))
    except redis.RedisError as exc:
        log.warning("could not publish activation of version %s: %s", version, exc)


class ActivationSubscriber:
    """Calls ``on_activated(version)`` for each message on the channel; reconnects forever."""

    def __init__(self, url: str, on_activated: Callable[[int], None]) -> None:
        self.url, self.on_activated = url, on_activated
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="activation-subscriber", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            client = redis.Redis.from_url(self.url, socket_connect_timeout=2.0, decode_responses=True)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(ACTIVATED_CHANNEL)
                backoff = 0.5
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["type"] == "message":
                        self._deliver(message["data"])
            except redis.RedisError as exc:
                log.info("activation subscriber disconnected (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                try:
                    pubsub.close()
                    client.close()
                except redis.RedisError:
                    pass

    def _deliver(self, data: str) -> None:
        try:
            self.on_activated(int(data))
        except Exception:  # a bad message or a failed refresh must not kill the thread
            log.exception("handling activation message %r failed", data)
