"""One pure-ASGI middleware in front of everything: metrics, body limit, content type.

- request latency histogram per route template + status, in-flight gauge;
- bodies over ``max_body_bytes`` get 413 before anything is parsed: from Content-Length
  when present, else while buffering a chunked body;
- a POST with a body must be ``application/json`` (415 otherwise).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response
from app.serving.metrics import ServingMetrics

BODY_METHODS = {"POST", "PUT", "PATCH"}


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class ServingMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServingMetrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self._latency: dict[tuple[str, str, int], Any] = {}  # labelled children, looked up once

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]
        metrics = self.metrics
        metrics.in_flight.inc()
        try:
            if scope["method"] in BODY_METHODS:
                checked = await self._check_body(scope, receive)
                if isinstance(checked, tuple):
                    code, message = checked
                    status[0] = code
                    headers = {"Connection": "close"} if code == 413 else None
                    await error_response(scope["path"], code, message, headers)(scope, receive, send)
                    return
                receive = checked

            async def send_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            await self.app(scope, receive, send_status)
        finally:
            metrics.in_flight.dec()
            label = scope.get("skqk.route") or getattr(scope.get("route"), "path", None) or "unmatched"
            key = (scope["method"], label, status[0])
            child = self._latency.get(key)
            if child is None:
                child = self._latency[key] = metrics.request_latency.labels(key[0], label, str(key[2]))
            child.observe(time.perf_counter() - started)

    async def _check_body(self, scope: Scope, receive: Receive) -> Receive | tuple[int, str]:
        content_length: int | None = None
        content_type: str | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    return 400, "Content-Length header is not an integer"
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        if content_length is not None and content_length > self.max_body_bytes:
            return 413, (f"request body of {content_length} bytes exceeds the limit of "
                         f"{self.max_body_bytes} bytes (SKQK_MAX_BODY_BYTES)")
        has_body = (content_length or 0) > 0 or chunked
        if has_body and (content_type is None or not _is_json(content_type)):
            got = repr(content_type) if content_type is not None else "none"
            return 415, f"Content-Type must be application/json; got {got}"
        if content_length is not None or not chunked:
            return receive
        # chunked: buffer up to the limit, then replay to the app
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return 413, (f"request body exceeds the limit of {self.max_body_bytes} bytes "
                             "(SKQK_MAX_BODY_BYTES)")
            if not message.get("more_body", False):
                break
        replayed = [False]

        async def replay() -> dict[str, Any]:
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return replay
