"""A small, bounded HTTP/1.1 load generator (keep-alive, one request in flight per connection).

Only ever talks to 127.0.0.1; every run is capped both in requests and in seconds.
Raw asyncio protocol + uvloop so the client costs much less CPU than the server it measures
(the benchmark machine has 2 cores shared by client and server).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

HOST = "127.0.0.1"


@dataclass
class RunResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def p50_ms(self) -> float:
        return 1000 * statistics.median(self.latencies) if self.latencies else float("nan")

    @property
    def p99_ms(self) -> float:
        return 1000 * self.percentile(0.99)


def build_request(path: str, body: bytes, port: int, extra_headers: str = "") -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra_headers}\r\n")
    return head.encode() + body


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None
        self.need: int | None = None
        self.header_end = 0
        self.status = 0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            self.status = int(head[9:12])
            length = 0
            i = head.find(b"\r\ncontent-length:")  # at a line start: not inference-header-content-length
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17:j if j > 0 else len(head)])
            self.header_end = end + 4
            self.need = self.header_end + length
        if len(self.buf) >= self.need:
            body = bytes(self.buf[self.header_end:self.need])
            del self.buf[:self.need]
            self.need = None
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result((self.status, body))

    async def request(self, data: bytes) -> tuple[int, bytes]:
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(data)
        return await self.waiter


async def _run(port: int, requests: list[bytes], concurrency: int, max_requests: int,
               max_seconds: float) -> RunResult:
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(concurrency):
        _t, proto = await loop.create_connection(_Conn, HOST, port)
        conns.append(proto)
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + max_seconds

    async def worker(conn: _Conn) -> None:
        nonlocal issued, errors
        while issued < max_requests and time.perf_counter() < deadline:
            data = requests[issued % len(requests)]
            issued += 1
            t0 = time.perf_counter()
            try:
                status, _body = await conn.request(data)
            except ConnectionError:
                errors += 1
                return
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    seconds = time.perf_counter() - started
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return RunResult(concurrency, len(latencies), errors, seconds, latencies)


def run_load(port: int, requests: list[bytes], concurrency: int, max_requests: int = 20_000,
             max_seconds: float = 3.0) -> RunResult:
    """Closed-loop load: ``concurrency`` connections, each sends its next request on reply."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    return runner(_run(port, requests, concurrency, max_requests, max_seconds))
