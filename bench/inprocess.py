"""Server CPU per request without sockets: drive ASGI apps directly, in this process.

This isolates what the application itself costs per request (parsing, validation, batching,
the forward pass, encoding, metrics) from the HTTP server and the load generator, which
share the machine's cores in the network benchmark. CPU time is ``time.process_time()``,
so it includes the inference thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

ASGIApp = Callable[..., Awaitable[None]]


def _scope(path: str, body: bytes) -> dict[str, Any]:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"host", b"127.0.0.1")]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
            "root_path": "", "state": {}}


class _Cycle:
    """Stands in for uvicorn's request cycle: ``receive`` is a bound method of an object whose
    ``more_body`` says the body is already in memory, as uvicorn's says for a small body."""

    more_body = False

    def __init__(self, body: bytes) -> None:
        self.body: bytes | None = body

    async def receive(self) -> dict[str, Any]:
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}


async def _call(app: ASGIApp, path: str, body: bytes) -> int:
    receive = _Cycle(body).receive
    status = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(path, body), receive, send)
    return status


async def _with_lifespan(app: ASGIApp, body: Callable[[], Awaitable[Any]]) -> Any:
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                   inbox.get, outbox.put))
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"startup failed: {started}")
    try:
        return await body()
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task


async def _measure(app: ASGIApp, path: str, bodies: list[bytes], concurrency: int, requests: int
                   ) -> tuple[float, float]:
    async def worker(k: int, offset: int) -> None:
        for i in range(k):
            status = await _call(app, path, bodies[(offset + i) % len(bodies)])
            if status != 200:
                raise RuntimeError(f"status {status}")

    await worker(100, 0)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(requests // concurrency, j) for j in range(concurrency)))
    return (time.perf_counter() - wall, time.process_time() - cpu)


def cpu_per_request(app: ASGIApp, path: str, bodies: list[bytes], concurrency: int = 64,
                    requests: int = 6400, lifespan: bool = False, ready: Callable[[], bool] | None = None
                    ) -> float:
    """Microseconds of this process's CPU per request at the given concurrency."""

    async def run() -> float:
        if ready is not None:
            for _ in range(600):
                if ready():
                    break
                await asyncio.sleep(0.05)
        _wall, cpu = await _measure(app, path, bodies, concurrency, requests)
        return cpu / requests * 1e6

    async def main() -> float:
        return await (_with_lifespan(app, run) if lifespan else run())

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:  # pragma: no cover
        return asyncio.run(main())
