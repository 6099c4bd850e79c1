"""A thin fast path for the inference endpoints (``/predict`` and v2 ``infer``).

The FastAPI routes in :mod:`app.api.inference` define these endpoints; ``ServingMiddleware``
hands this class the body it has already read and checked, and it answers with the very same
payload functions (``predict_payload`` / ``v2_infer_payload``), minus FastAPI's per-request
routing and dependency machinery, which on a small CPU box costs more than the model. Errors
go through the same ``ApiError`` → ``{"error": …}`` rendering, so behaviour is identical
(the API tests run against it), the predict-scope key check included (skipped, at the
cost of one attribute test, when no predict key is set). v2 answers with binary tensor data
(:mod:`app.api.v2_binary`) are encoded here as well. ``SKQK_FAST_PATH=false`` turns it off.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.types import Scope, Send

from app.api.errors import ApiError
from app.api.inference import predict_payload, v2_infer_payload
from app.api.v2_binary import HEADER_KEY, V2_INFER_PATH, BinaryAnswer, encode_answer

log = logging.getLogger("skqk.api")

_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY
_JSON_TYPE = [(b"content-type", b"application/json")]
Handler = Callable[[Any, bytes], Awaitable[dict[str, Any] | BinaryAnswer]]


def _header(scope: Scope, key: bytes) -> bytes | None:
    for name, value in scope["headers"]:  # ASGI header names are lower-case
        if name == key:
            return value
    return None


class InferenceFastPath:
    """Called by ``ServingMiddleware`` with the body it has already read and checked."""

    def __init__(self) -> None:
        self.state: Any = None  # the AppState, set by the lifespan while the app runs

    def match(self, scope: Scope) -> tuple[str, Handler] | None:
        """(route label, handler) for an inference request once the app has started, else None."""
        if scope["method"] != "POST" or self.state is None:
            return None
        path = scope["path"]
        if path == "/predict":
            return "/predict", predict_payload
        m = V2_INFER_PATH.match(path)
        if m is None:
            return None
        name, version = m.group(1), m.group(2)
        label = "/v2/models/{name}/infer" if version is None else "/v2/models/{name}/versions/{version}/infer"
        header = _header(scope, HEADER_KEY)  # binary tensor data: the JSON part's length

        async def v2(st: Any, body: bytes) -> dict[str, Any] | BinaryAnswer:
            return await v2_infer_payload(st, body, name, version, header)

        return label, v2

    async def respond(self, scope: Scope, body: bytes, send: Send, label: str, handler: Handler) -> int:
        """Answer the request; returns the status sent."""
        state = self.state
        headers: list[tuple[bytes, bytes]] = _JSON_TYPE
        try:
            if state.keys.predict is not None:  # only when SKQK_PREDICT_API_KEY is set
                state.keys.check("predict", _header(scope, b"x-api-key"))
            payload = await handler(state, body)
            status = 200
        except ApiError as exc:
            status = exc.status
            payload = {"error": exc.message}
            if exc.extra and not label.startswith("/v2"):
                payload.update(exc.extra)
            extra = (exc.headers or {}).items()
            headers = [*_JSON_TYPE, *((k.lower().encode(), v.encode()) for k, v in extra)]
        except Exception as exc:
            log.exception("inference request failed")
            status, payload = 500, {"error": f"internal error: {type(exc).__name__}"}
        if type(payload) is BinaryAnswer:
            content, headers = encode_answer(payload)
        else:
            content = orjson.dumps(payload, option=_JSON_OPTS)
        # Content-Length right after Content-Type: a naive client searching the head for
        # "content-length:" must not hit Inference-Header-Content-Length first
        await send({"type": "http.response.start", "status": status, "headers": [
            headers[0], (b"content-length", str(len(content)).encode()), *headers[1:]]})
        await send({"type": "http.response.body", "body": content})
        return status
