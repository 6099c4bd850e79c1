"""Per-app objects (store, holder, batcher, runner, metrics) and helpers shared by routers."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from sqlalchemy.exc import DBAPIError

from app.api.errors import ApiError
from app.api.rows import Where
from app.core.features import FeatureSchema
from app.serving.batcher import Batcher, InferenceResult, NotReady, QueueFull, ShapeMismatch
from app.serving.holder import LoadedModel, ModelHolder
from app.serving.metrics import ServingMetrics
from app.serving.runner import RetrainRunner
from app.settings import Settings
from app.storage import Store

RETRY_AFTER = {"Retry-After": "1"}


@dataclass
class AppState:
    settings: Settings
    store: Store
    metrics: ServingMetrics
    holder: ModelHolder
    batcher: Batcher
    runner: RetrainRunner
    api_key: str

    def require_model(self) -> LoadedModel:
        loaded = self.holder.current
        if loaded is None:
            raise ApiError(503, "no model loaded yet; retry shortly", RETRY_AFTER)
        return loaded

    async def infer(self, x: np.ndarray, target: LoadedModel | None = None) -> InferenceResult:
        try:
            return await self.batcher.infer(x, target)
        except QueueFull:
            raise ApiError(503, "inference queue is full; retry shortly", RETRY_AFTER) from None
        except NotReady as exc:
            raise ApiError(503, f"not ready: {exc}", RETRY_AFTER) from None
        except ShapeMismatch as exc:
            raise ApiError(503, str(exc), RETRY_AFTER) from None

    def check_ranges(self, schema: FeatureSchema, x: np.ndarray, endpoint: str, where: Where,
                     refuse: bool) -> None:
        """Per-feature ranges (``SKQK_INPUT_RANGE``): count the rows outside, refuse if asked.

        ``refuse`` is the caller's policy under ``warn`` (ingest refuses, predict serves);
        ``reject`` refuses everywhere and ``off`` checks nothing.
        """
        mode = self.settings.input_range
        if mode == "off" or not schema.has_ranges:
            return
        count, first = schema.out_of_range_rows(x)
        if first is None:
            return
        self.metrics.input_out_of_range.labels(endpoint).inc(count)
        if refuse or mode == "reject":
            row, col = first
            raise ApiError(422, f"{where(row)}: {schema.range_message(x, row, col)} "
                                f"(SKQK_INPUT_RANGE={mode})")


def get_state(request: Request) -> AppState:
    return request.app.state.skqk


def require_api_key(request: Request) -> None:
    """Admin endpoints: ``X-API-Key`` compared in constant time; 401 otherwise."""
    provided = request.headers.get("x-api-key")
    expected = get_state(request).api_key
    if provided is None:
        raise ApiError(401, "missing X-API-Key header (admin endpoint)", {"WWW-Authenticate": "ApiKey"})
    if not secrets.compare_digest(provided.encode("utf-8", "surrogateescape"), expected.encode()):
        raise ApiError(401, "invalid X-API-Key", {"WWW-Authenticate": "ApiKey"})


def store_unavailable(exc: DBAPIError) -> ApiError:
    return ApiError(503, f"model/data store unavailable: {type(exc.orig).__name__}", RETRY_AFTER)


def check_float32(x: np.ndarray, field: str) -> np.ndarray:
    """Values that are finite as JSON numbers can still overflow float32."""
    finite = np.isfinite(x)
    if not finite.all():
        idx = np.argwhere(~finite)[0]
        where = "".join(f"[{int(i)}]" for i in idx)
        raise ApiError(422, f"{field}{where}: value is out of float32 range")
    return x
