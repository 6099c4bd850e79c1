"""The FastAPI application: ``create_app()`` (a uvicorn factory) wires store, holder, batcher,
retrain runner and metrics together in the lifespan.

Startup never blocks on the model: ``/v2/health/live`` answers at once, ``/v2/health/ready``
turns 200 once the active version is loaded and warmed up. A background task re-reads the
active version every ``poll_interval_s`` (``ModelHolder.refresh``), so a replica follows
promotions made anywhere, with or without Redis; in distributed mode a Redis subscriber
calls the same ``refresh`` as soon as a worker or another replica announces a promotion.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api import admin, data, explain, health, inference
from app.api.errors import install_error_handlers
from app.api.fastpath import InferenceFastPath
from app.api.health import flight
from app.api.middleware import BodyLimits, ServingMiddleware
from app.api.openapi import install_openapi
from app.api.samples_admin import router as samples_admin_router
from app.api.state import AppState, install_store_error_handler
from app.distributed import ActivationSubscriber
from app.retrain.plan import METRIC_CAP, plan_retrain
from app.retrain.runners import build_runner
from app.serving.batcher import Batcher
from app.serving.holder import ModelHolder
from app.serving.metrics import ServingMetrics
from app.settings import Settings, get_settings, resolve_api_key
from app.storage import JobRecord, Store
from app.storage.guard import call_timeout, set_call_timeout
from app.storage.job_stats import retrain_stats

log = logging.getLogger("skqk.api")


def configure_torch(threads: int) -> None:
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only allowed before any inter-op work started
        torch.set_num_interop_threads(1)


async def _poll_active_version(holder: ModelHolder, interval: float) -> None:
    # one refresh at a time, each store call bounded: a hung store never piles up threads
    set_call_timeout(holder.store.timeouts.call_s)
    while True:
        try:
            await asyncio.to_thread(holder.refresh)
        except Exception:
            log.exception("active-version poll failed")
        await asyncio.sleep(interval)


def settle_heap() -> tuple[int, int, int]:
    """Tune the garbage collector for serving, once everything long-lived exists.

    The ~250k objects allocated by now (torch, FastAPI, SQLAlchemy …) live as long as the
    process: frozen, they are out of the collector's reach, where every full collection under
    load used to walk them all and stall the event loop for 100+ ms (the p99). A young
    generation of 10,000 instead of 700 allocations: each request allocates a few dozen
    containers that die young by reference counting, so collecting them 14× less often costs
    nothing in memory and saves a few % of CPU per request.
    """
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, *before[1:])
    return before


def unsettle_heap(threshold: tuple[int, int, int]) -> None:
    """Undo ``settle_heap`` at shutdown: what dies with the app (in tests, the app) can be collected."""
    gc.unfreeze()
    gc.set_threshold(*threshold)


class SkqkApp:
    """The ASGI entry point: limits + metrics, the inference fast path, then FastAPI.

    Wrapping FastAPI from the outside keeps its per-request machinery off the hot path;
    everything else (``state``, ``routes``, ``openapi()`` …) is the FastAPI app's.
    """

    def __init__(self, api: FastAPI, settings: Settings, metrics: ServingMetrics,
                 fast: InferenceFastPath | None) -> None:
        self.fastapi = api
        self._http = ServingMiddleware(api, metrics=metrics, limits=BodyLimits.from_settings(settings),
                                       store_timeout_s=settings.store_timeout_s, fast=fast)
        install_store_error_handler(api)  # a store failure escaping a route: 503, not 500

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        else:  # lifespan (and anything else) straight to FastAPI
            await self.fastapi(scope, receive, send)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fastapi, name)


def _store_gauges(st: AppState) -> None:
    """Gauges read from the SQL store when /metrics is scraped; a store outage keeps the last values."""
    metrics = st.metrics
    with call_timeout(st.settings.store_timeout_s):
        try:
            metrics.samples_total.set(st.store.sample_count())
        except Exception:
            metrics.store_up.set(0)
            return
        metrics.store_up.set(1)
        # Drift comes from the SQL job table, so every replica reports the same, whoever ran it.
        with contextlib.suppress(Exception):
            latest = st.store.list_jobs(("succeeded",), 1)
            if latest:
                metrics.set_drift((latest[0].result or {}).get("drift"))
        # So do the retrain gauges (jobs, last success/failure, duration, queue wait, backlog).
        with contextlib.suppress(Exception):
            metrics.set_retrain_stats(retrain_stats(st.store))
            metrics.retrain_new_samples.set(plan_retrain(st.store, cap=METRIC_CAP).new_samples)


def create_app(settings: Settings | None = None, store: Store | None = None) -> SkqkApp:
    settings = settings or get_settings()
    metrics = ServingMetrics()
    api_key = resolve_api_key(settings)
    fast = InferenceFastPath() if settings.fast_path else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_torch(settings.torch_threads)
        own_store = store is None
        st_store = store or Store(settings.resolved_database_url)
        await asyncio.to_thread(st_store.create_schema)
        holder = ModelHolder(st_store, settings.device, metrics,
                             warmup_batch_sizes=(1, settings.max_batch_size),
                             version_cache_size=settings.version_cache_size)
        batcher = Batcher(holder, settings.max_batch_size, settings.max_queue_delay_ms,
                          settings.max_queue_size, metrics, torch_threads=settings.torch_threads,
                          inference_thread=settings.inference_thread)
        await batcher.start()

        def on_finished(job: JobRecord) -> None:
            if (job.result or {}).get("promoted"):
                holder.refresh(force=True)

        runner = build_runner(settings, st_store, on_finished=on_finished)
        app.state.skqk = AppState(settings, st_store, metrics, holder, batcher, runner, api_key)
        if fast is not None:
            fast.state = app.state.skqk
        poll = asyncio.create_task(_poll_active_version(holder, settings.poll_interval_s))
        subscriber = None
        if settings.redis_url:  # distributed: hear promotions at once; the poll covers lost messages
            def on_activated(_version: int) -> None:
                with call_timeout(st_store.timeouts.call_s):  # a hung store must not hold the holder
                    holder.refresh(force=True)

            subscriber = ActivationSubscriber(settings.redis_url, on_activated)
            subscriber.start()
        gc_threshold = settle_heap()
        try:
            yield
        finally:
            if fast is not None:
                fast.state = None
            unsettle_heap(gc_threshold)
            if subscriber is not None:
                subscriber.stop()
            poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poll
            await asyncio.to_thread(runner.close)
            await batcher.stop()
            if own_store:
                st_store.dispose()

    # /docs and /redoc load Swagger UI / ReDoc from fastapi-offline's wheel (/static-offline-docs):
    # they work on an offline or firewalled host, where the CDN FastAPI links by default is blank
    app = FastAPIOffline(title="skqk-serve", version="0.1.0", lifespan=lifespan,
                         summary="ReLU nets served as frozen PathSelector + retrainable Estimator")
    install_error_handlers(app)
    app.include_router(inference.router)
    app.include_router(explain.router)
    app.include_router(data.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    install_openapi(app, settings)  # bodies, real status codes, X-API-Key (app/api/openapi.py)
    app.include_router(samples_admin_router)  # after data.router: GET /samples/count stays public

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        st: AppState = request.app.state.skqk
        metrics.queue_depth.set(st.batcher.queue_depth)
        try:  # one store read at a time; a store slower than the health timeout keeps the last values
            await flight(request, "skqk_store_gauges").run(lambda: _store_gauges(st),
                                                           settings.store_health_timeout_s)
        except TimeoutError:
            metrics.store_up.set(0)
        return Response(metrics.render(), media_type=metrics.content_type)

    return SkqkApp(app, settings, metrics, fast)
