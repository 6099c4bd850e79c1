"""Which retrain workers consume a queue right now: heartbeats the workers write into Redis.

Without it, ``POST /retrain`` with no worker running says 202 ``queued`` and the job waits
out ``SKQK_RETRAIN_QUEUE_TIMEOUT_S`` (10 minutes) holding the retrain lock. With it the API
answers 503 naming the queue at once, and ``GET /retrain/{id}`` says how many workers are
online.

Why heartbeats and not Celery's ``inspect().ping()``: a broadcast waits its whole timeout
for answers (every ``POST /retrain`` would pay it, or a cache would hide a worker that just
started), while a heartbeat read is one Redis round trip. Each worker's main process (not its
pool children, so a worker busy training still beats) runs a thread that, every ttl/3 s,
``ZADD``s its node name into ``skqk:workers:<queue>`` for every queue it consumes, with the
score "expires at" in *Redis's* clock (``TIME`` inside a Lua script: hosts' clocks never
matter). Counting is ``ZCOUNT`` of unexpired members; a worker that stops cleanly removes
itself at once, a killed one drops out after ``SKQK_RETRAIN_WORKER_TTL_S``. A Redis restart
without persistence forgets them until their next beat (at most ttl/3 s).
"""

from __future__ import annotations

import logging
import threading
import time

import redis

log = logging.getLogger("skqk.workers")

KEY = "skqk:workers:{queue}"

# KEYS[1] the queue's set; ARGV: node, ttl seconds. Prunes the expired, then adds/refreshes.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 2))
return 1
"""
# KEYS[1] the queue's set → members not expired yet
_COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


def beat(client: redis.Redis, queues: list[str], node: str, ttl_s: float) -> None:
    for queue in queues:
        client.eval(_BEAT, 1, KEY.format(queue=queue), node, ttl_s)


def leave(client: redis.Redis, queues: list[str], node: str) -> None:
    for queue in queues:
        client.zrem(KEY.format(queue=queue), node)


def workers_online(client: redis.Redis, queue: str) -> int:
    """Workers whose heartbeat for ``queue`` has not expired (raises ``RedisError``)."""
    return int(client.eval(_COUNT, 1, KEY.format(queue=queue)))


class Heartbeat:
    """A worker's heartbeat thread: beats until :meth:`stop`, which also leaves the sets."""

    def __init__(self, client: redis.Redis, queues: list[str], node: str, ttl_s: float) -> None:
        self.client, self.queues, self.node, self.ttl_s = client, queues, node, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="skqk-worker-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._beat()  # online before the first interval passes
        self._thread.start()
        log.info("worker %s announces itself on queue(s) %s (ttl %.0fs)", self.node, ",".join(self.queues),
                 self.ttl_s)
        return self

    def _beat(self) -> None:
        try:
            beat(self.client, self.queues, self.node, self.ttl_s)
        except redis.RedisError as exc:  # Redis away: the broker connection says so too; retry
            log.warning("worker heartbeat failed: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            self._beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            leave(self.client, self.queues, self.node)
        except redis.RedisError as exc:  # it expires after the ttl
            log.warning("could not remove the worker heartbeat: %s", exc)


class PresenceCache:
    """The API side: ``workers_online(queue)``, remembered for ``max_age_s`` (status reads poll);
    None when Redis cannot say (also remembered, so polling a dead Redis stays cheap)."""

    def __init__(self, client: redis.Redis, max_age_s: float = 2.0) -> None:
        self.client, self.max_age_s = client, max_age_s
        self._lock = threading.Lock()
        self._cached: dict[str, tuple[float, int | None]] = {}

    def get(self, queue: str, fresh: bool = False) -> int | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cached.get(queue)
        if hit is not None and not fresh and now - hit[0] < self.max_age_s:
            return hit[1]
        try:
            value: int | None = workers_online(self.client, queue)
        except redis.RedisError:
            value = None
        with self._lock:
            self._cached[queue] = (now, value)
        return value
