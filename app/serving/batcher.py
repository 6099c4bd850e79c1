"""Dynamic batching: concurrent requests merged into one forward pass.

Requests queue on the event loop; one collector task forms batches of up to
``max_batch_size`` rows and hands each to a single inference thread (one is right for a
small CPU box; torch's own intra-op threads do the maths), or runs a short pass on the loop
itself when the process has only one CPU (``SKQK_INFERENCE_THREAD``, see ``_on_loop``). A
batch resolves its model once, when it starts (the active version, or the explicit version a
request asked for), and requests for different versions never share a batch.

When to send a batch: at once if it is full; at once if the previous batch had a single
request (no concurrent load, so waiting would only add latency); otherwise only while
requests keep arriving, one event-loop pass at a time, and at most ``max_queue_delay_ms``
after the oldest request. While a forward pass runs, arrivals simply accumulate, so under
load batches grow on their own.

The queue is bounded: ``QueueFull`` (→ 503 + Retry-After) when ``max_queue_size`` requests
are waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from app.serving.holder import LoadedModel, ModelHolder
from app.serving.metrics import ServingMetrics

log = logging.getLogger("skqk.batcher")

INLINE_MAX_S = 0.002  # auto: a forward pass this short may run on the event loop itself


def runs_on_one_cpu() -> bool:
    """Whether this process may only use one CPU (``taskset``, a one-CPU cpuset …)."""
    try:
        return len(os.sched_getaffinity(0)) == 1
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() == 1


class QueueFull(RuntimeError):
    """Too many requests are waiting; retry later."""


class NotReady(RuntimeError):
    """No model is loaded yet."""


class Float32Overflow(ValueError):
    """A float64 row holds a value beyond float32's range (the caller has not checked that)."""


class ShapeMismatch(RuntimeError):
    """The version a batch resolved to takes another input width than the request was checked for."""


@dataclass
class InferenceResult:
    version: int
    outputs: np.ndarray  # float32 [n, C]
    predictions: np.ndarray  # int64 [n]
    finite: bool = True  # False: some output of the whole batch is inf/NaN; look closer


@dataclass(eq=False)
class _Pending:
    x: np.ndarray
    target: LoadedModel | None  # None: whatever is active when the batch starts
    future: asyncio.Future[InferenceResult]
    enqueued: float


class Batcher:
    def __init__(self, holder: ModelHolder, max_batch_size: int = 64, max_queue_delay_ms: float = 2.0,
                 max_queue_size: int = 2048, metrics: ServingMetrics | None = None,
                 torch_threads: int = 1, inference_thread: str = "auto") -> None:
        self.holder = holder
        self.inference_thread = inference_thread  # auto | on | off (see _on_loop)
        self._one_cpu = runs_on_one_cpu()
        self.torch_threads = torch_threads
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.metrics = metrics
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._last_batch_requests = 1

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skqk-infer",
                                            initializer=self._init_thread)
        self._task = asyncio.create_task(self._collect(), name="skqk-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(NotReady("server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _init_thread(self) -> None:
        # OpenMP/MKL thread counts are per OS thread: a fresh thread would otherwise use every
        # core and spin-wait between ops, starving the event loop on a small machine.
        import torch

        torch.set_num_threads(self.torch_threads)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # ---- submitting ---------------------------------------------------------------------------
    async def infer(self, x: np.ndarray, target: LoadedModel | None = None) -> InferenceResult:
        """Queue ``x`` (float32 [n, D]) and wait for its slice of a batch."""
        if self._wakeup is None:
            raise NotReady("batcher not started")
        if len(self._queue) >= self.max_queue_size:
            if self.metrics is not None:
                self.metrics.queue_rejections.inc()
            raise QueueFull(f"{len(self._queue)} requests already waiting")
        future: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(x, target, future, time.perf_counter()))
        self._queued_rows += x.shape[0]
        self._wakeup.set()
        return await future

    # ---- batching loop ------------------------------------------------------------------------
    async def _collect(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._last_batch_requests > 1 and self.max_delay > 0:
                await self._gather_arrivals()
            batch = self._take()
            if not batch:
                continue
            self._last_batch_requests = len(batch)
            started = time.perf_counter()
            if self.metrics is not None:
                for p in batch:
                    self.metrics.queue_time.observe(started - p.enqueued)
                self.metrics.queue_depth.set(len(self._queue))
            try:
                if self._on_loop(batch):
                    results = self._run_batch(batch)
                else:
                    results = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as exc:  # a broken model must not kill the collector
                log.exception("inference failed for a batch of %d requests", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, result in zip(batch, results, strict=True):
                if p.future.done():  # client went away
                    continue
                if isinstance(result, BaseException):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)

    def _on_loop(self, batch: list[_Pending]) -> bool:
        """Run this batch on the event loop instead of the inference thread?

        With one CPU the thread buys no parallelism, only a hand-off each way (a wake-up, the
        GIL, the loop's self-pipe), and for a short pass that costs more than it saves. A long
        pass stays on the thread so that the OS still time-slices the loop (health checks,
        other requests) while it runs.
        """
        if self.inference_thread != "auto":
            return self.inference_thread == "off"
        model = batch[0].target or self.holder.current
        return self._one_cpu and model is not None and model.batch_seconds <= INLINE_MAX_S

    async def _gather_arrivals(self) -> None:
        """Let requests that are arriving right now join the batch, then stop.

        One pass of the event loop at a time: as long as each pass queues more rows (requests
        still coming in), take another, until the batch is full or ``max_queue_delay_ms`` after
        the oldest request. A pass that brings nothing ends the wait, so a closed loop of C
        clients is not held for the whole delay when C is below the batch size.
        """
        deadline = self._queue[0].enqueued + self.max_delay
        while self._queued_rows < self.max_batch_size and time.perf_counter() < deadline:
            before = self._queued_rows
            await asyncio.sleep(0)  # the loop reads ready sockets; their request tasks run
            await asyncio.sleep(0)  # (a task created in one pass first runs in the next)
            if self._queued_rows == before:
                return

    def _take(self) -> list[_Pending]:
        """Pop requests while they fit in one batch (always at least one)."""
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            nxt = self._queue[0]
            n = nxt.x.shape[0]
            if batch and rows + n > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= n
            if nxt.future.done():  # cancelled while waiting
                continue
            batch.append(nxt)
            rows += n
        return batch

    # ---- on the inference thread -----------------------------------------------------------------
    @staticmethod
    def _float32_rows(batch: list[_Pending], members: list[int],
                      results: list[InferenceResult | BaseException]) -> tuple[np.ndarray, list[int]]:
        """The members' rows as one float32 array, and the members left in it.

        float64 rows (the plain /predict parse) are converted here, once per batch rather than
        once per request; a request with a value float32 cannot hold gets ``Float32Overflow``.
        """
        parts = [batch[i].x for i in members]
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if x.dtype == np.float32:
            return x, members
        with np.errstate(over="ignore"):  # overflow → inf, found just below
            x = x.astype(np.float32)
            if np.isfinite(x).all():  # the float64 rows were finite: inf here means overflow
                return x, members
            keep = []
            for i in members:
                if np.isfinite(batch[i].x.astype(np.float32)).all():
                    keep.append(i)
                else:
                    results[i] = Float32Overflow("a value is out of float32 range")
            if not keep:
                return x[:0], keep
            return np.concatenate([batch[i].x for i in keep]).astype(np.float32), keep

    def _run_batch(self, batch: list[_Pending]) -> list[InferenceResult | BaseException]:
        active = self.holder.current  # resolved once: the whole batch sees one version
        groups: dict[int, list[int]] = {}
        models: dict[int, LoadedModel] = {}
        results: list[InferenceResult | BaseException] = [NotReady("no model loaded")] * len(batch)
        for i, p in enumerate(batch):
            model = p.target or active
            if model is None:
                continue
            groups.setdefault(id(model), []).append(i)
            models[id(model)] = model
        for key, members in groups.items():
            model = models[key]
            bad = [i for i in members if batch[i].x.shape[1] != model.input_dim]
            for i in bad:
                results[i] = ShapeMismatch(f"version {model.version} takes {model.input_dim} features; "
                                           "the active model changed, retry")
            members = [i for i in members if i not in bad]
            x, members = self._float32_rows(batch, members, results)
            if not members:
                continue
            try:
                t0 = time.perf_counter()
                logits = model.infer(x)
                predictions = logits.argmax(axis=1)
                finite = bool(np.isfinite(logits).all())  # once per batch, not per request
                if self.metrics is not None:
                    self.metrics.inference_time.observe(time.perf_counter() - t0)
                    self.metrics.batch_size.observe(x.shape[0])
                    self.metrics.batch_requests.observe(len(members))
            except Exception as exc:
                log.exception("inference failed on version %d", model.version)
                for i in members:
                    results[i] = exc
                continue
            start = 0
            for i in members:
                n = batch[i].x.shape[0]
                results[i] = InferenceResult(model.version, logits[start:start + n],
                                             predictions[start:start + n], finite)
                start += n
        return results
