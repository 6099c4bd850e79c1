"""Dynamic batching with fake models: merging, limits, version purity, back-pressure."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from app.serving.batcher import Batcher, Float32Overflow, NotReady, QueueFull
from app.serving.metrics import ServingMetrics


@dataclass(eq=False)
class FakeModel:
    version: int
    input_dim: int = 3
    num_outputs: int = 2
    delay: float = 0.0
    calls: list[int] = field(default_factory=list)
    gate: threading.Event | None = None
    batch_seconds: float = 0.0
    threads: list[str] = field(default_factory=list)

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(x.shape[0])
        self.threads.append(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        # output row = (version, first feature): lets a test check both row order and version
        return np.stack([np.full(x.shape[0], self.version, np.float32), x[:, 0]], axis=1)


class FakeHolder:
    def __init__(self, model: FakeModel | None) -> None:
        self.current = model


def run(coro):
    return asyncio.run(coro)


async def _with_batcher(holder: FakeHolder, body, **kwargs):
    batcher = Batcher(holder, metrics=ServingMetrics(), **kwargs)
    await batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.stop()


def _row(i: float) -> np.ndarray:
    return np.array([[i, 0.0, 0.0]], dtype=np.float32)


def test_concurrent_requests_are_merged_and_answered_in_order() -> None:
    model = FakeModel(1, delay=0.01)

    async def body(b: Batcher) -> list:
        return await asyncio.gather(*(b.infer(_row(i)) for i in range(40)))

    results = run(_with_batcher(FakeHolder(model), body, max_batch_size=64, max_queue_delay_ms=5))
    assert len(model.calls) < 40  # merged
    assert sum(model.calls) == 40
    for i, r in enumerate(results):
        assert r.version == 1
        assert r.outputs.shape == (1, 2) and r.outputs[0, 1] == i  # each got its own row back
        assert r.predictions.shape == (1,)


def test_batches_never_exceed_max_batch_size_and_big_requests_run_alone() -> None:
    model = FakeModel(1, delay=0.002)

    async def body(b: Batcher) -> list:
        small = [b.infer(_row(i)) for i in range(30)]
        big = b.infer(np.zeros((20, 3), np.float32))
        return await asyncio.gather(*small, big)

    results = run(_with_batcher(FakeHolder(model), body, max_batch_size=8, max_queue_delay_ms=2))
    assert max(model.calls) <= 20
    assert all(c <= 8 for c in model.calls if c != 20)
    assert results[-1].outputs.shape == (20, 2)


def test_single_requests_are_not_delayed_without_concurrency() -> None:
    model = FakeModel(1)

    async def body(b: Batcher) -> None:
        for i in range(5):
            await b.infer(_row(i))

    run(_with_batcher(FakeHolder(model), body, max_batch_size=64, max_queue_delay_ms=1000))
    # five sequential requests with a huge max delay: they still finish (no wait for company)
    assert model.calls == [1] * 5


def test_a_batch_never_mixes_versions_while_swapping() -> None:
    models = [FakeModel(v) for v in (1, 2, 3)]
    holder = FakeHolder(models[0])
    stop = threading.Event()

    def swapper() -> None:
        i = 0
        while not stop.is_set():
            holder.current = models[i % 3]
            i += 1
            time.sleep(0.0005)

    async def body(b: Batcher) -> list:
        results = []
        for _ in range(20):
            results += await asyncio.gather(*(b.infer(_row(i)) for i in range(16)))
        return results

    t = threading.Thread(target=swapper)
    t.start()
    try:
        results = run(_with_batcher(holder, body, max_batch_size=16, max_queue_delay_ms=1))
    finally:
        stop.set()
        t.join()
    for r in results:
        assert r.outputs[0, 0] == r.version  # the rows came from the version the response names
    assert len({r.version for r in results}) > 1  # the swap did happen meanwhile


def test_explicit_versions_get_their_own_forward_pass() -> None:
    active, pinned = FakeModel(5), FakeModel(2)

    async def body(b: Batcher) -> list:
        return await asyncio.gather(b.infer(_row(0)), b.infer(_row(1), target=pinned), b.infer(_row(2)))

    results = run(_with_batcher(FakeHolder(active), body, max_batch_size=64, max_queue_delay_ms=5))
    assert [r.version for r in results] == [5, 2, 5]
    assert pinned.calls == [1]


def test_full_queue_rejects_instead_of_growing() -> None:
    gate = threading.Event()
    model = FakeModel(1, gate=gate)

    async def body(b: Batcher) -> tuple[int, int]:
        tasks = [asyncio.ensure_future(b.infer(_row(i))) for i in range(10)]
        await asyncio.sleep(0.05)
        gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        return (sum(isinstance(o, QueueFull) for o in outcomes),
                sum(not isinstance(o, BaseException) for o in outcomes))

    rejected, served = run(_with_batcher(FakeHolder(model), body, max_batch_size=1, max_queue_size=3))
    assert rejected > 0 and served > 0 and rejected + served == 10


def test_no_model_means_not_ready() -> None:
    async def body(b: Batcher) -> None:
        await b.infer(_row(0))

    with pytest.raises(NotReady):
        run(_with_batcher(FakeHolder(None), body))


def test_a_closed_loop_below_the_batch_size_is_not_held_for_the_whole_delay() -> None:
    # Rounds of 3 concurrent requests with a 60 s max delay: once the 3 are queued, no more
    # arrive, so each batch goes at once instead of waiting for 64 rows or 60 s.
    model = FakeModel(1)

    async def body(b: Batcher) -> None:
        for _ in range(4):
            await asyncio.wait_for(asyncio.gather(*(b.infer(_row(i)) for i in range(3))), 20)

    run(_with_batcher(FakeHolder(model), body, max_batch_size=64, max_queue_delay_ms=60_000))
    assert sum(model.calls) == 12 and max(model.calls) == 3


def test_float64_rows_are_converted_per_batch_and_an_overflow_fails_only_its_request() -> None:
    model = FakeModel(1, delay=0.01)

    async def body(b: Batcher) -> list:
        rows = [np.array([[i, 0.0, 0.0]]) for i in range(6)]  # float64, as the plain /predict parse gives
        rows[3] = np.array([[3.0, 1e39, 0.0]])  # finite in float64, inf in float32
        return await asyncio.gather(*(b.infer(r) for r in rows), return_exceptions=True)

    results = run(_with_batcher(FakeHolder(model), body, max_batch_size=64, max_queue_delay_ms=5))
    assert isinstance(results[3], Float32Overflow)
    for i in (0, 1, 2, 4, 5):
        assert results[i].outputs.dtype == np.float32 and results[i].outputs[0, 1] == i
    assert sum(model.calls) == 5


@pytest.mark.parametrize(("setting", "one_cpu", "batch_seconds", "on_loop"), [
    ("off", False, 1.0, True),
    ("on", True, 0.0, False),
    ("auto", True, 0.0005, True),
    ("auto", True, 0.5, False),  # a long pass keeps the loop answering (the OS time-slices it)
    ("auto", False, 0.0005, False),  # several CPUs: the thread runs beside the loop
])
def test_where_forward_passes_run(setting: str, one_cpu: bool, batch_seconds: float, on_loop: bool) -> None:
    model = FakeModel(1, batch_seconds=batch_seconds)

    async def body(b: Batcher) -> None:
        b._one_cpu = one_cpu
        await b.infer(_row(0))

    run(_with_batcher(FakeHolder(model), body, inference_thread=setting))
    assert (model.threads == [threading.main_thread().name]) is on_loop
