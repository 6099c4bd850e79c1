"""/ingest: validate against the served model's schema, commit in one transaction, then answer.

``X-API-Key`` with the ingest scope when ``SKQK_INGEST_API_KEY`` is set (else open). Also
``GET /samples/count`` (read-only, no key): how many samples the store holds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from app.api.errors import ApiError, FastJSONResponse, parse_body
from app.api.rows import parse_labels, parse_rows, parse_targets
from app.api.schemas import IngestRequest
from app.api.state import AppState, get_state, require_ingest_key, store_unavailable
from app.api.table_rows import parse_table_rows
from app.core.features import FeatureSchema
from app.storage import IdempotencyConflict

router = APIRouter()


def _features_at(i: int) -> str:
    return f"samples[{i}].features"


def _label_at(i: int) -> str:
    return f"samples[{i}].label"


def _labelled(labels: list[Any], schema: FeatureSchema) -> dict[str, np.ndarray]:
    """Store.ingest's keyword for these labels: class indices, or regression targets."""
    if schema.is_regression:
        return {"targets": parse_targets(labels, schema, _label_at)}
    return {"labels": parse_labels(labels, schema, _label_at)}


def _ingest(st: AppState, body: bytes) -> dict[str, object]:
    req = parse_body(IngestRequest, body)
    if not req.samples:
        raise ApiError(422, "samples: must contain at least one sample")
    schema = st.require_model().schema
    raw = None
    if schema.encoding is not None:  # raw table rows: stored as they came (unknown categories too)
        rows = parse_table_rows([s.features for s in req.samples], schema, _features_at, "samples")
        x, raw = rows.x, rows.raw_json()
    else:
        x = parse_rows([s.features for s in req.samples], schema, _features_at, "samples")
    y = _labelled([s.label for s in req.samples], schema)
    # out-of-range rows are never stored unless the check is off (warn refuses here)
    st.check_ranges(schema, x, "ingest", _features_at, refuse=True)
    try:
        result = st.store.ingest(x, idempotency_key=req.idempotency_key, raw=raw, **y)
    except IdempotencyConflict as exc:
        st.metrics.ingest_requests.labels("conflict").inc()
        raise ApiError(409, f"idempotency_key: {exc}") from None
    except DBAPIError as exc:
        raise store_unavailable(exc) from None
    if result.duplicate:
        st.metrics.ingest_requests.labels("duplicate").inc()
    else:
        st.metrics.ingest_requests.labels("accepted").inc()
        st.metrics.ingest_samples.inc(result.accepted)
    # a duplicate stored nothing now: accepted 0 (the first request's answer said how many)
    return {"accepted": 0 if result.duplicate else result.accepted, "total_samples": result.total_samples,
            "duplicate": result.duplicate}


@router.post("/ingest", dependencies=[Depends(require_ingest_key)])
async def ingest(request: Request) -> Response:
    st = get_state(request)
    body = await request.body()
    try:
        payload = await run_in_threadpool(_ingest, st, body)
    except ApiError as exc:
        if exc.status < 500:
            st.metrics.ingest_requests.labels("rejected").inc()
        raise
    return FastJSONResponse(payload)


@router.get("/samples/count")
async def samples_count(request: Request) -> Response:
    st = get_state(request)
    try:
        total = await run_in_threadpool(st.store.sample_count)
    except DBAPIError as exc:
        raise store_unavailable(exc) from None
    return FastJSONResponse({"total": total})
