"""One pure-ASGI middleware in front of everything: metrics, body limits, content type.

- request latency histogram per route template + status, in-flight gauge;
- bodies over ``max_body_bytes`` get 413 before anything is parsed: from Content-Length
  when present, else while buffering a chunked body;
- a POST with a body must be ``application/json`` (415 otherwise), except on the v2 infer
  routes, which also take ``application/octet-stream`` (binary tensor data) and no
  Content-Type at all (what Triton's own client sends; Triton accepts it); a compressed
  body (``Content-Encoding`` other than identity) is a 415 too: nothing here decompresses;
- the body is read here and replayed to the app: it must arrive within ``body_timeout_s``
  (else 408, connection closed), and bodies over 64 KiB first reserve their size from the
  process's budget of in-flight body bytes (``BodyBudget``): one that does not fit in time
  gets 503 + Retry-After, one larger than the whole budget 413;
- before a refused request (413, 503, 415, 400) is answered, what is left of its body is read
  and dropped (up to ``DRAIN_MAX`` bytes, within ``body_timeout_s``): closing a connection
  with unread bytes makes the kernel send a reset, and a client still sending its body then
  sees "connection reset" instead of the answer. Nothing drained is kept;
- store calls made while handling the request are bounded by ``store_timeout_s``
  (see app.storage.guard), so a hung database turns into a 503, not a hung request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import NamedTuple

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.body_budget import BodyBudget
from app.api.errors import error_response
from app.api.fastpath import InferenceFastPath
from app.api.v2_binary import OCTET_STREAM, is_v2_infer
from app.serving.loop_metrics import LoopHistogramChild
from app.serving.metrics import ServingMetrics
from app.settings import Settings
from app.storage.guard import set_call_timeout

BODY_METHODS = {"POST", "PUT", "PATCH"}
_EMPTY_BODY: Message = {"type": "http.request", "body": b"", "more_body": False}  # no body: nothing read
SMALL_BODY = 64 * 1024  # not counted: uvicorn buffers this much per connection anyway
CLOSE = {"Connection": "close"}
DRAIN_MAX = 64 * 1024 * 1024  # read and drop at most this much of a refused body; beyond, just close
_DRAINED = {400, 413, 415, 503}


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _content_type_refusal(path: str, content_type: str | None) -> Refusal | None:
    """415 unless the body's type suits the route (called only for a type that is not JSON)."""
    if is_v2_infer(path):  # the Open Inference Protocol's clients
        if content_type is None or content_type.split(";", 1)[0].strip().lower() == OCTET_STREAM:
            return None
        return Refusal(415, "Content-Type must be application/json (or application/octet-stream with "
                            f"binary tensor data, or none); got {content_type!r}")
    # elsewhere strictly JSON: a body without a type is what a cross-site form or fetch can send
    got = repr(content_type) if content_type is not None else "none"
    return Refusal(415, f"Content-Type must be application/json; got {got}")


@dataclass(frozen=True)
class BodyLimits:
    max_body_bytes: int
    body_timeout_s: float = 30.0
    max_inflight_body_bytes: int = 64 * 1024 * 1024
    body_budget_wait_s: float = 1.0

    @classmethod
    def from_settings(cls, s: Settings) -> BodyLimits:
        return cls(s.max_body_bytes, s.body_timeout_s, s.max_inflight_body_bytes, s.body_budget_wait_s)


class Refusal(NamedTuple):
    status: int
    message: str
    headers: dict[str, str] | None = None


class ServingMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServingMetrics, limits: BodyLimits,
                 store_timeout_s: float | None = None, fast: InferenceFastPath | None = None) -> None:
        self.app = app
        self.fast = fast  # answers the inference routes below FastAPI, from the body read here
        self.metrics = metrics
        self.limits = limits
        self.max_body_bytes = limits.max_body_bytes
        self.budget = BodyBudget(limits.max_inflight_body_bytes, limits.body_budget_wait_s)
        self.store_timeout_s = store_timeout_s
        self._latency: dict[tuple[str, str, int], LoopHistogramChild] = {}  # looked up once per key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        in_flight = self.metrics.in_flight
        in_flight.value += 1
        if self.store_timeout_s is not None:
            set_call_timeout(self.store_timeout_s)  # this request's task (and its threads) only
        held = 0
        try:
            fast = self.fast.match(scope) if self.fast is not None else None
            message: Message = _EMPTY_BODY
            if scope["method"] in BODY_METHODS:
                checked = await self._read_body(scope, receive)
                if type(checked) is Refusal:
                    status = checked.status
                    if status in _DRAINED:
                        await self._discard_body(scope, receive)
                    await error_response(scope["path"], checked.status, checked.message,
                                         checked.headers)(scope, receive, send)
                    return
                message, held = checked
            if fast is not None and message["type"] == "http.request":
                scope["skqk.route"] = fast[0]
                status = await self.fast.respond(scope, message["body"], send, *fast)  # type: ignore[union-attr]
                return
            if message is not _EMPTY_BODY:
                receive = _replay_message(message, receive)
            sent: list[int] = []

            async def send_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    sent.append(message["status"])
                await send(message)

            try:
                await self.app(scope, receive, send_status)
            finally:
                status = sent[0] if sent else 500
        finally:
            if held:
                self._release(held)
            in_flight.value -= 1
            label = scope.get("skqk.route") or getattr(scope.get("route"), "path", None) or "unmatched"
            key = (scope["method"], label, status)
            child = self._latency.get(key)
            if child is None:
                child = self._latency[key] = self.metrics.request_latency.labels(key[0], label, str(status))
            child.observe(time.perf_counter() - started)

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[Message, int] | Refusal:
        """Check the headers, reserve, read the whole body in time: (the body as one message, bytes held).

        The message is ``http.request`` with the whole body, or what ended the reading (a disconnect).
        """
        content_length: int | None = None
        content_type: str | None = None
        encoding: bytes | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    return Refusal(400, "Content-Length header is not an integer")
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-encoding":
                encoding = value
        limit = self.max_body_bytes
        if content_length is not None and content_length > limit:
            return Refusal(413, f"request body of {content_length} bytes exceeds the limit of {limit} "
                                "bytes (SKQK_MAX_BODY_BYTES)", CLOSE)
        has_body = (content_length or 0) > 0 or chunked
        if has_body and (content_type is None or not _is_json(content_type)):
            refused = _content_type_refusal(scope["path"], content_type)
            if refused is not None:
                return refused
        if has_body and encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
            return Refusal(415, f"Content-Encoding {encoding.decode('latin-1')[:40]!r} is not supported; "
                                "send the body uncompressed")
        if not has_body:
            return _EMPTY_BODY, 0
        held = [0]  # bytes reserved for this body so far
        if content_length is not None and content_length > SMALL_BODY:
            refused = await self._reserve(content_length)
            if refused is not None:
                return refused
            held[0] = content_length
        try:
            if _body_complete(receive):  # already in memory: nothing to wait for, no timer to pay
                return await self._read(receive, held, content_length)
            async with asyncio.timeout(self.limits.body_timeout_s):
                return await self._read(receive, held, content_length)
        except TimeoutError:
            if held[0]:
                self._release(held[0])
            return Refusal(408, f"request body not received within {self.limits.body_timeout_s:g} s "
                                "(SKQK_BODY_TIMEOUT_S)", CLOSE)
        except BaseException:  # e.g. cancelled at shutdown: never keep the reservation
            if held[0]:
                self._release(held[0])
            raise

    async def _read(self, receive: Receive, held: list[int], content_length: int | None
                    ) -> tuple[Message, int] | Refusal:
        """The whole body → (one message holding it, bytes held); a Refusal gives them back.

        ``held[0]`` always says what is reserved, so a timeout can give back a chunked reservation.
        """
        limit = self.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: pass that on
                return message, held[0]
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                self._release(held[0])
                return Refusal(413, f"request body exceeds the limit of {limit} bytes "
                                    "(SKQK_MAX_BODY_BYTES)", CLOSE)
            if size > SMALL_BODY and not held[0]:  # chunked: reserve the most it may grow to
                refused = await self._reserve(min(limit, self.budget.capacity))
                if refused is not None:
                    return refused
                held[0] = min(limit, self.budget.capacity)
            if size > held[0] > 0:  # a chunked body beyond a budget smaller than the limit
                self._release(held[0])
                return self._over_budget(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if held[0] > size and content_length is None:  # chunked: keep only what it used
            self._release(held[0] - size)
            held[0] = size
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return {"type": "http.request", "body": body, "more_body": False}, held[0]

    async def _discard_body(self, scope: Scope, receive: Receive) -> None:
        """Read and drop the rest of a refused body, so the close after the answer is a clean one."""
        content_length = 0
        for name, value in scope["headers"]:
            if name == b"expect":  # the client waits for 100 Continue: it has sent no body; keep it so
                return
            if name == b"content-length" and value.isdigit():
                content_length = int(value)
        if content_length > DRAIN_MAX:  # not worth reading: close at once (the client may see a reset)
            return
        left = DRAIN_MAX
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                while left > 0:
                    message = await receive()
                    if message["type"] != "http.request":
                        return
                    left -= len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return
        except TimeoutError:
            return

    def _over_budget(self, size: int) -> Refusal:
        return Refusal(413, f"request body of {size} bytes exceeds the in-flight body budget of "
                            f"{self.budget.capacity} bytes (SKQK_MAX_INFLIGHT_BODY_BYTES)", CLOSE)

    async def _reserve(self, n: int) -> Refusal | None:
        if n > self.budget.capacity:
            return self._over_budget(n)
        if not await self.budget.acquire(n):
            return Refusal(503, "too many large request bodies in flight (SKQK_MAX_INFLIGHT_BODY_BYTES="
                                f"{self.budget.capacity}); retry shortly", {"Retry-After": "1", **CLOSE})
        self.metrics.body_bytes_in_flight.set(self.budget.used)
        return None

    def _release(self, n: int) -> None:
        self.budget.release(n)
        self.metrics.body_bytes_in_flight.set(self.budget.used)


def _body_complete(receive: Receive) -> bool:
    """Whether uvicorn already holds the whole body (its request cycle says so); False if unknown."""
    return getattr(getattr(receive, "__self__", None), "more_body", True) is False


def _replay_message(first: Message, receive: Receive) -> Receive:
    """A receive that hands out ``first``, then defers to the server's own."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return first
        return await receive()

    return replay
