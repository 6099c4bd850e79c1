"""Error responses and request parsing: every client error is a 4xx whose message names the field.

Shape: ``{"error": "<message>"}`` (the Open Inference Protocol's error shape) everywhere;
non-v2 endpoints may add fields (``detail`` with every validation error, ``job_id`` on 409).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.api.strict_json import duplicate_key_message, may_have_duplicate_keys

M = TypeVar("M", bound=BaseModel)


class FastJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.extra = extra


def format_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def describe_errors(errors: list[dict[str, Any]], limit: int = 3) -> str:
    parts = [f"{format_loc(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:limit]]
    more = len(errors) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def reject_duplicate_keys(body: bytes, parsed: Any) -> None:
    """400 naming the first repeated key of an object (parsers keep the last one silently).

    ``parsed`` is ``body`` as a strict parser read it (plain JSON values or a validated
    model); the exact, slower check runs only when a cheap count cannot rule duplicates out.
    """
    if may_have_duplicate_keys(body, parsed):
        message = duplicate_key_message(body)
        if message is not None:
            raise ApiError(400, message)


def _reject_duplicates_of_invalid(body: bytes) -> None:
    """Before a 422: a duplicated key is the clearer problem (and may be its cause)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:  # e.g. an integer beyond 64 bits: the exact check alone
        message = duplicate_key_message(body)
        if message is not None:
            raise ApiError(400, message) from None
        return
    reject_duplicate_keys(body, parsed)


def parse_body(model: type[M], body: bytes, what: str = "request body") -> M:
    """Validate raw JSON bytes; 400 for malformed JSON or a duplicated key, 422 naming the field."""
    if not body.strip():
        raise ApiError(400, f"{what} is empty; expected a JSON object")
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        if errors and errors[0].get("type") == "json_invalid":
            raise ApiError(400, f"{what} is not valid JSON: {errors[0].get('msg', '')}") from None
        _reject_duplicates_of_invalid(body)
        detail = [{"loc": format_loc(e.get("loc", ())), "msg": e.get("msg", "")} for e in errors[:20]]
        raise ApiError(422, describe_errors(errors), detail=detail) from None
    reject_duplicate_keys(body, parsed)
    return parsed


def error_response(request_path: str, status: int, message: str, headers: dict[str, str] | None = None,
                   extra: dict[str, Any] | None = None) -> Response:
    content: dict[str, Any] = {"error": message}
    if extra and not request_path.startswith("/v2"):
        content.update(extra)
    return FastJSONResponse(content, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(request.url.path, exc.status, exc.message, exc.headers, exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request.url.path, 422, describe_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return error_response(request.url.path, exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}")
