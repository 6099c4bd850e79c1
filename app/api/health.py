"""Store health, apart from model readiness.

``/v2/health/ready`` says whether this replica can serve predictions (the model is in
memory; the store is not needed for that). ``GET /health/store`` says whether it can do the
store's jobs right now (ingest, listings, retrains): a ``SELECT 1`` that must answer within
``SKQK_STORE_HEALTH_TIMEOUT_S``, else 503. Both it and ``/metrics`` refresh ``skqk_store_up``.

Store reads for health and metrics run one at a time (``SingleFlight``): a hung store
never gets more than one such thread, and callers stop waiting after the health timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from sqlalchemy import text
from starlette.responses import Response

from app.api.errors import FastJSONResponse
from app.api.state import RETRY_AFTER, AppState, get_state, store_failure
from app.storage.guard import call_timeout

router = APIRouter()
T = TypeVar("T")


class SingleFlight:
    """At most one run of a blocking function at a time; a caller waits for it ``wait_s`` at most."""

    def __init__(self) -> None:
        self._task: asyncio.Future[Any] | None = None

    async def run(self, fn: Callable[[], T], wait_s: float) -> T:
        """``fn()``'s result; TimeoutError when the run in flight takes longer than ``wait_s``."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(asyncio.to_thread(fn))
            self._task.add_done_callback(_retrieve)
        return await asyncio.wait_for(asyncio.shield(self._task), wait_s)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # seen by the callers that waited; nobody else must be warned


def flight(request: Request, name: str) -> SingleFlight:
    """The app's SingleFlight called ``name`` (made on first use)."""
    state = request.app.state
    found = getattr(state, name, None)
    if found is None:
        found = SingleFlight()
        setattr(state, name, found)
    return found


def _ping(st: AppState, timeout_s: float) -> None:
    with call_timeout(timeout_s), st.store.engine.connect() as conn:
        conn.execute(text("SELECT 1")).scalar_one()


@router.get("/health/store")
async def store_health(request: Request) -> Response:
    st = get_state(request)
    timeout_s = st.settings.store_health_timeout_s
    try:
        await flight(request, "skqk_store_probe").run(lambda: _ping(st, timeout_s), timeout_s)
    except Exception as exc:
        st.metrics.store_up.set(0)
        reason = f"no answer within {timeout_s:g} s" if isinstance(exc, TimeoutError) else store_failure(exc)
        return FastJSONResponse({"store": "down", "backend": st.store.backend,
                                 "error": f"sample store unavailable: {reason}"},
                                status_code=503, headers=RETRY_AFTER)
    st.metrics.store_up.set(1)
    return FastJSONResponse({"store": "up", "backend": st.store.backend})
