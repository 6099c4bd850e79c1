"""The Celery app for retrain workers, configured for long GPU tasks.

- acks_late + reject_on_worker_lost: a worker that dies mid-task gets its task redelivered
  instead of silently losing it; the job code is idempotent per job id (see tasks.py).
- prefetch 1, concurrency 1 per GPU, one task per child process: the parent never touches
  CUDA (it only forks), each retrain gets a fresh child with a clean CUDA context.
- broker visibility_timeout above the hard time limit, or Redis would redeliver a task
  that is still running.
- ``SKQK_RETRAIN_THREADS`` torch threads in every pool child (``worker_process_init``) and
  again at the start of each task: a retrain's floats depend on the thread count, so workers
  on machines of any size give bit-identical results at the same setting, as the embedded
  runner does; and one thread per retrain is what keeps several workers (or a worker and the
  API) on one host from oversubscribing its cores (docs/OPERATIONS.md, "Threads").
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


def apply_retrain_threads() -> int:
    """Torch threads of this process for retrain work: ``SKQK_RETRAIN_THREADS`` (default 1)."""
    import contextlib

    import torch

    threads = get_settings().retrain_threads
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only before any inter-op work started
        torch.set_num_interop_threads(1)
    return threads


@signals.worker_process_init.connect
def _pool_child_threads(**_kwargs: Any) -> None:
    """In each prefork pool child, right after the fork, before it takes a task."""
    apply_retrain_threads()


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
