"""Per-app objects (store, holder, batcher, runner, metrics) and helpers shared by routers."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Request
from sqlalchemy import exc as sa_exc
from starlette.responses import Response

from app.api.auth import ApiKeys, Scope, resolve_keys
from app.api.errors import ApiError, error_response
from app.api.rows import Where
from app.api.table_rows import TableRows
from app.core.features import FeatureSchema
from app.retrain.protocol import RetrainRunner
from app.serving.batcher import Batcher, InferenceResult, NotReady, QueueFull, ShapeMismatch
from app.serving.holder import LoadedModel, ModelHolder
from app.serving.metrics import ServingMetrics
from app.settings import Settings
from app.storage import Store
from app.storage.guard import StoreTimeout

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
    keys: ApiKeys = field(init=False)  # every scope's key, resolved once at start-up

    def __post_init__(self) -> None:
        self.keys = resolve_keys(self.settings, self.api_key)

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


    def check_unknown(self, rows: TableRows, endpoint: str, where: Where) -> None:
        """Categories outside the vocabulary (``SKQK_UNKNOWN_CATEGORY``): count them; refuse
        under ``reject`` naming the first (row, feature, value)."""
        if not rows.unknown:
            return
        for feature, n in rows.unknown_counts().items():
            self.metrics.unknown_categories.labels(endpoint, feature).inc(n)
        if self.settings.unknown_category == "reject":
            raise ApiError(422, f"{rows.first_unknown(where)} (SKQK_UNKNOWN_CATEGORY=reject)")


def get_state(request: Request) -> AppState:
    return request.app.state.skqk


def require_scope(scope: Scope) -> Callable[[Request], Awaitable[None]]:
    """A route dependency: ``X-API-Key`` must grant ``scope`` (401 missing/unknown, 403 lacking)."""

    async def dependency(request: Request) -> None:  # async: no thread-pool hop per request
        provided = request.headers.get("x-api-key")  # latin-1 text: encode back to the raw bytes
        get_state(request).keys.check(scope, None if provided is None else provided.encode("latin-1"))

    return dependency


require_api_key = require_scope("admin")  # retrain, activate, sample admin
require_ingest_key = require_scope("ingest")  # open unless SKQK_INGEST_API_KEY is set
require_predict_key = require_scope("predict")  # open unless SKQK_PREDICT_API_KEY is set


def store_unavailable(exc: Exception) -> ApiError:
    """503 + Retry-After naming the store, with why: a timeout of ours, or the error's class."""
    return ApiError(503, f"sample store unavailable: {store_failure(exc)}", RETRY_AFTER)


def check_float32(x: np.ndarray, field: str) -> np.ndarray:
    """Values that are finite as JSON numbers can still overflow float32."""
    finite = np.isfinite(x)
    if not finite.all():
        idx = np.argwhere(~finite)[0]
        where = "".join(f"[{int(i)}]" for i in idx)
        raise ApiError(422, f"{field}{where}: value is out of float32 range")
    return x


# ---- store failures (timeouts and lost connections) -----------------------------------------
def store_failure(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    if isinstance(orig, StoreTimeout):
        return str(orig)
    if isinstance(exc, sa_exc.TimeoutError):
        return "no free store connection in time (SKQK_DB_POOL_TIMEOUT_S)"
    return type(orig if orig is not None else exc).__name__


def store_errors() -> tuple[type[Exception], ...]:
    """Connection-level store failures that may escape a route: each is a 503, not a 500."""
    errors: list[type[Exception]] = [sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError]
    with contextlib.suppress(ImportError):
        import psycopg

        errors.append(psycopg.OperationalError)  # raw driver calls (the ingest's COPY)
    return tuple(errors)


def install_store_error_handler(app: FastAPI) -> None:
    async def _store_error(request: Request, exc: Exception) -> Response:
        error = store_unavailable(exc)
        return error_response(request.url.path, error.status, error.message, error.headers)

    for cls in store_errors():
        app.add_exception_handler(cls, _store_error)
