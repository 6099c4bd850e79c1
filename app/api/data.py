"""/ingest: validate against the served model, commit in one transaction, then answer."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from app.api.errors import ApiError, FastJSONResponse, parse_body
from app.api.schemas import IngestRequest
from app.api.state import AppState, check_float32, get_state, store_unavailable
from app.storage import IdempotencyConflict

router = APIRouter()


def _ingest(st: AppState, body: bytes) -> dict[str, object]:
    req = parse_body(IngestRequest, body)
    if not req.samples:
        raise ApiError(422, "samples: must contain at least one sample")
    loaded = st.require_model()
    width, classes = loaded.input_dim, loaded.num_outputs
    for i, sample in enumerate(req.samples):
        if len(sample.features) != width:
            raise ApiError(422, f"samples[{i}].features: expected {width} features, "
                                f"got {len(sample.features)}")
        if not 0 <= sample.label < classes:
            raise ApiError(422, f"samples[{i}].label: must be in [0, {classes - 1}], got {sample.label}")
    with np.errstate(over="ignore"):  # overflow becomes inf, reported just below
        x = np.asarray([s.features for s in req.samples], dtype=np.float32)
    check_float32(x, "samples[*].features")
    y = np.asarray([s.label for s in req.samples], dtype=np.int64)
    try:
        result = st.store.ingest(x, y, req.idempotency_key)
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
    return {"accepted": result.accepted, "total_samples": result.total_samples,
            "duplicate": result.duplicate}


@router.post("/ingest")
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
