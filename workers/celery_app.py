"""The Celery app for retrain workers, configured for long GPU tasks.

- acks_late + reject_on_worker_lost: a worker that dies mid-task gets its task redelivered
  instead of silently losing it; the job code is idempotent per job id (see tasks.py).
- prefetch 1, concurrency 1 per GPU, one task per child process: the parent never touches
  CUDA (it only forks), each retrain gets a fresh child with a clean CUDA context.
- broker visibility_timeout above the hard time limit, or Redis would redeliver a task
  that is still running.
"""

from __future__ import annotations

from celery import Celery

from app.distributed import GPU_QUEUE, RETRAIN_TASK
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
