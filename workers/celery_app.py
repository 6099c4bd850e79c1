"""The Celery app for retrain workers, configured for long GPU tasks.

- acks_late + reject_on_worker_lost: a worker that dies mid-task gets its task redelivered
  instead of silently losing it; the job code is idempotent per job id (see tasks.py).
- prefetch 1, concurrency 1 per GPU, one task per child process: the parent never touches
  CUDA (it only forks), each retrain gets a fresh child with a clean CUDA context.
- broker visibility_timeout above the hard time limit, or Redis would redeliver a task
  that is still running.
- a heartbeat per worker in Redis (``app.retrain.worker_presence``), started when the worker
  is ready and removed when it shuts down: ``POST /retrain`` answers 503 when no worker
  consumes the queue instead of queueing a job nobody will run.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from app.distributed import GPU_QUEUE, RETRAIN_TASK, redis_client
from app.retrain.worker_presence import Heartbeat
from app.settings import get_settings


def make_celery() -> Celery:
    settings = get_settings()
    url = settings.redis_url or "redis://127.0.0.1:6379/0"
    hard = settings.retrain_time_limit_s
    transport = {"visibility_timeout": hard + 600}
    app = Celery("skqk", broker=url, backend=url, include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        worker_concurrency=1,
        task_time_limit=hard,
        task_soft_time_limit=max(hard - 60, 1),
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        task_routes={RETRAIN_TASK: {"queue": GPU_QUEUE}},
        task_default_queue=GPU_QUEUE,
        worker_hijack_root_logger=False,
    )
    return app


celery_app = make_celery()


_heartbeat: Heartbeat | None = None


@signals.worker_ready.connect
def _announce(sender: Any, **_kwargs: Any) -> None:
    """In the worker's main process (it forks the pool; a busy worker still beats)."""
    global _heartbeat
    settings = get_settings()
    if not settings.redis_url:
        return
    queues = sorted(sender.app.amqp.queues.consume_from)
    _heartbeat = Heartbeat(redis_client(settings.redis_url), queues, sender.hostname,
                           settings.retrain_worker_ttl_s).start()


@signals.worker_shutdown.connect
def _leave(**_kwargs: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
