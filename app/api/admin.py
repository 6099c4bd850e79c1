"""/retrain, /retrain/{job_id}, /models, /models/{version}/activate.

``POST /retrain`` first asks whether anything lies beyond the active version's data watermark
(``app.retrain.plan``): nothing → 200 ``skipped``, no job, no version, unless
``force``. ``mode`` defaults to ``auto`` (the drift rule picks qk, refresh or full when the job runs).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from app.api.errors import ApiError, FastJSONResponse, parse_body
from app.api.schemas import ActivateRequest, RetrainRequest
from app.api.state import RETRY_AFTER, get_state, require_api_key, store_unavailable
from app.core.spec import ArchSpec
from app.distributed import publish_activated, redis_client
from app.retrain.plan import plan_retrain
from app.retrain.protocol import RetrainInProgress, RetrainQueueUnavailable
from app.serving.models import public_schema, schema_of
from app.storage import JobRecord, UnknownVersion, VersionRecord
from app.storage.store import utcnow

log = logging.getLogger("skqk.api")
router = APIRouter()


@router.post("/retrain", dependencies=[Depends(require_api_key)])
async def retrain(request: Request) -> Response:
    st = get_state(request)
    body = await request.body()
    req = parse_body(RetrainRequest, body) if body.strip() else RetrainRequest()
    mode = req.mode
    if not req.force:
        try:
            plan = await run_in_threadpool(plan_retrain, st.store)
        except DBAPIError as exc:
            raise store_unavailable(exc) from None
        if plan.nothing_new:
            return FastJSONResponse(plan.skipped())
    try:
        job_id = await run_in_threadpool(st.runner.submit, mode)
    except RetrainInProgress as exc:
        raise ApiError(409, f"a retrain is already running (job {exc.job_id})", job_id=exc.job_id) from None
    except RetrainQueueUnavailable as exc:
        raise ApiError(503, f"retrain queue unavailable: {exc}", RETRY_AFTER) from None
    except DBAPIError as exc:
        raise store_unavailable(exc) from None
    return FastJSONResponse({"job_id": job_id, "status": "queued", "mode": mode}, status_code=202,
                            headers={"Location": f"/retrain/{job_id}"})


@router.get("/retrain/{job_id}")
async def retrain_status(job_id: str, request: Request) -> Response:
    st = get_state(request)
    job = await run_in_threadpool(st.runner.status, job_id)
    if job is None:
        raise ApiError(404, f"job_id: no retrain job {job_id!r}")
    online = await run_in_threadpool(st.runner.workers_online)
    return FastJSONResponse({**job.to_dict(), "queued_for_s": queued_for_s(job), "workers_online": online})


def queued_for_s(job: JobRecord) -> float | None:
    """How long the job waited for a runner: until it started (or ended unstarted), else so far."""
    if job.created_at is None:
        return None
    until = job.started_at or job.finished_at or utcnow()
    return round(max((until - job.created_at).total_seconds(), 0.0), 3)


@router.post("/retrain/{job_id}/cancel", dependencies=[Depends(require_api_key)])
async def cancel_retrain(job_id: str, request: Request) -> Response:
    """Cancel a job: a queued one at once (200 ``cancelled``, the next /retrain may start);
    a running one is asked to stop between epochs (202 ``cancelling``; it ends ``cancelled``)."""
    st = get_state(request)
    try:
        outcome = await run_in_threadpool(st.runner.cancel, job_id)
        job = None if outcome else await run_in_threadpool(st.runner.status, job_id)
    except RetrainQueueUnavailable as exc:
        raise ApiError(503, f"retrain queue unavailable: {exc}", RETRY_AFTER) from None
    except DBAPIError as exc:
        raise store_unavailable(exc) from None
    if outcome is None:
        if job is None:
            raise ApiError(404, f"job_id: no retrain job {job_id!r}")
        raise ApiError(409, f"job {job_id} is already {job.status}", job_id=job_id)
    return FastJSONResponse({"job_id": job_id, "status": outcome},
                            status_code=200 if outcome == "cancelled" else 202)


def _version_schema(record: VersionRecord) -> dict[str, Any] | None:
    """A version's public feature schema (names, task, classes, ranges, normalisation)."""
    try:
        spec = ArchSpec.from_dict(record.architecture)
        return public_schema(schema_of(record, spec), spec)
    except Exception:  # one unreadable row must not hide the whole listing
        log.warning("version %s: cannot describe its schema", record.version, exc_info=True)
        return None


def _version_entry(record: VersionRecord, active: int | None) -> dict[str, Any]:
    return {**record.summary(record.version == active), "schema": _version_schema(record)}


@router.get("/models")
async def list_models(request: Request) -> Response:
    st = get_state(request)

    def collect() -> tuple[list[dict[str, Any]], int | None]:
        active = st.store.active_version()
        # the summary rows carry the architecture and feature_schema columns (not the weights)
        return [_version_entry(v, active) for v in st.store.list_versions()], active

    try:
        versions, active = await run_in_threadpool(collect)
    except DBAPIError as exc:
        raise store_unavailable(exc) from None
    serving = st.holder.current
    # The body is the list the contract names; which version is active store-wide and which
    # one this process serves right now (they differ for a moment during a swap) are headers.
    headers = {"X-Active-Version": str(active),
               "X-Serving-Version": str(serving.version if serving else None)}
    return FastJSONResponse(versions, headers=headers)


@router.post("/models/{version}/activate", dependencies=[Depends(require_api_key)])
async def activate(version: int, request: Request) -> Response:
    st = get_state(request)
    if not 1 <= version <= 2**31 - 1:  # beyond the store's integer column: cannot exist
        raise ApiError(404, f"version: model version {version} does not exist")
    body = await request.body()
    reason = (parse_body(ActivateRequest, body).reason if body.strip() else None) or "manual activation"
    actor = f"api:{request.client.host if request.client else 'unknown'}"
    try:
        previous, loaded = await run_in_threadpool(st.holder.activate, version, actor, reason)
    except UnknownVersion:
        raise ApiError(404, f"version: model version {version} does not exist") from None
    except DBAPIError as exc:
        raise store_unavailable(exc) from None
    except Exception as exc:
        serving = st.holder.current
        raise ApiError(409, f"version {version} failed to load and was not activated "
                            f"({type(exc).__name__}: {exc}); still serving "
                            f"{serving.version if serving else 'nothing'}") from None
    if st.settings.redis_url:  # tell the other replicas now rather than at their next poll
        await run_in_threadpool(publish_activated, redis_client(st.settings.redis_url), loaded.version)
    return FastJSONResponse({"active_version": loaded.version, "previous_version": previous,
                             "serving_version": st.holder.current.version if st.holder.current else None})
