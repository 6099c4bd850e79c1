"""What the API sees of a retrain runner, and what every runner shares.

Job status always comes from the ``retrain_jobs`` table, whichever runner ran the job:
queued → running (a compare-and-set, so only one run starts a job) → succeeded | failed |
cancelled. The embedded runner (:mod:`app.retrain.embedded_runner`) and the Celery runner
(:mod:`app.retrain.celery_runner`) both implement :class:`RetrainRunner`;
:func:`app.retrain.runners.build_runner` picks one from the settings, so neither imports the
other.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from app.retrain.job import REQUEST_MODES
from app.storage import JobRecord

RETRAIN_LEASE = "retrain"
FinishedHook = Callable[[JobRecord], None]


class RetrainInProgress(RuntimeError):
    """Another retrain is queued or running (→ HTTP 409 with its id)."""

    def __init__(self, job_id: str | None) -> None:
        super().__init__(f"retrain job {job_id} is already running")
        self.job_id = job_id


class RetrainQueueUnavailable(RuntimeError):
    """The queue/worker backend cannot take jobs right now (→ HTTP 503)."""


@runtime_checkable
class RetrainRunner(Protocol):
    def submit(self, mode: str) -> str:
        """Start (or enqueue) a retrain (``auto`` | ``qk`` | ``full``); returns its job id.

        Raises ``RetrainInProgress`` or ``RetrainQueueUnavailable`` (no worker consumes the
        queue, the broker is down, the server is closing); ``ValueError`` for a bad mode.
        Whether there is anything new to train on is the caller's question
        (``app.retrain.plan``).
        """
        ...

    def workers_online(self) -> int | None:
        """How many workers could run a queued job right now; None: not applicable (embedded)
        or unknown (the broker is unreachable)."""
        ...

    def status(self, job_id: str) -> JobRecord | None:
        """The job row (None when unknown)."""
        ...

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job: ``"cancelled"`` when that took effect at once (a queued job: its lock
        is free again), ``"cancelling"`` when a running job was asked to stop between epochs
        (it ends ``cancelled``), None when the job is unknown or already finished."""
        ...

    def close(self) -> None:
        """Stop background work (server shutdown)."""
        ...


def new_job_id() -> str:
    return uuid.uuid4().hex


def check_mode(mode: str) -> None:
    if mode not in REQUEST_MODES:
        raise ValueError(f"mode must be one of {list(REQUEST_MODES)}, got {mode!r}")


