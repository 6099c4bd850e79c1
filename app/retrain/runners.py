"""Pick the retrain runner for these settings (the one module that knows both)."""

from __future__ import annotations

from typing import Any

from app.retrain.embedded_runner import EmbeddedRunner
from app.retrain.protocol import FinishedHook, RetrainRunner
from app.settings import Settings
from app.storage import Store


def build_runner(settings: Settings, store: Store, on_finished: FinishedHook | None = None,
                 **kwargs: Any) -> RetrainRunner:
    """The runner for these settings: embedded when ``redis_url`` is unset.

    Distributed mode (``SKQK_REDIS_URL`` set) returns the Celery-backed runner, with the same
    protocol; ``on_finished`` is only meaningful in-process (replicas learn about promotions
    through Redis pub/sub and their poll, both ending in ``ModelHolder.refresh``).
    """
    if settings.redis_url is None:
        return EmbeddedRunner(store, settings, on_finished=on_finished, **kwargs)
    from app.retrain.celery_runner import CeleryRunner  # celery only in distributed mode

    runner = CeleryRunner(store, settings)
    runner.start()  # re-publishes lost messages, fails jobs whose worker died
    return runner
