"""A thin ASGI fast path for the inference endpoints (``/predict`` and v2 ``infer``).

The FastAPI routes in :mod:`app.api.inference` define these endpoints; this middleware
answers the same requests with the very same payload functions
(``predict_payload`` / ``v2_infer_payload``), minus FastAPI's per-request routing and
dependency machinery, which on a small CPU box costs more than the model. Errors go
through the same ``ApiError`` → ``{"error": …}`` rendering, so behaviour is identical
(the API tests run against it), the predict-scope key check included (skipped, at the
cost of one attribute test, when no predict key is set). ``SKQK_FAST_PATH=false`` turns
it off.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import ApiError
from app.api.inference import predict_payload, v2_infer_payload

log = logging.getLogger("skqk.api")

_V2_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY
Handler = Callable[[Any, bytes], Awaitable[dict[str, Any]]]


def _api_key(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:  # ASGI header names are lower-case
        if name == b"x-api-key":
            return value
    return None


class InferenceFastPath:
    def __init__(self, app: ASGIApp, state: Callable[[], Any]) -> None:
        self.app = app
        self.state = state  # → the AppState (None until the lifespan has started)

    def _match(self, scope: Scope) -> tuple[str, Handler] | None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        path = scope["path"]
        if path == "/predict":
            return "/predict", predict_payload
        m = _V2_INFER.match(path)
        if m is None:
            return None
        name, version = m.group(1), m.group(2)
        label = "/v2/models/{name}/infer" if version is None else "/v2/models/{name}/versions/{version}/infer"

        async def v2(st: Any, body: bytes) -> dict[str, Any]:
            return await v2_infer_payload(st, body, name, version)

        return label, v2

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = self._match(scope)
        state = self.state()
        if matched is None or state is None:
            await self.app(scope, receive, send)
            return
        label, handler = matched
        scope["skqk.route"] = label
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        headers: list[tuple[bytes, bytes]] = []
        try:
            if state.keys.predict is not None:  # only when SKQK_PREDICT_API_KEY is set
                state.keys.check("predict", _api_key(scope))
            payload = await handler(state, body)
            status = 200
        except ApiError as exc:
            status = exc.status
            payload = {"error": exc.message}
            if exc.extra and not label.startswith("/v2"):
                payload.update(exc.extra)
            headers = [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
        except Exception as exc:
            log.exception("inference request failed")
            status, payload = 500, {"error": f"internal error: {type(exc).__name__}"}
        content = orjson.dumps(payload, option=_JSON_OPTS)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
            *headers]})
        await send({"type": "http.response.body", "body": content})
