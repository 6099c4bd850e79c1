"""uvicorn's HTTP protocols plus a request-header read timeout (uvicorn has none).

uvicorn's keep-alive timeout only covers an idle connection between requests, and any byte
cancels it, so a client sending one header byte a second holds a connection (and its
buffers) forever. Here a timer runs from the moment a connection opens, or from the first
byte of the next request on a kept-alive connection, until that request's headers are
complete (uvicorn starts its ASGI cycle); if it fires first, the client gets a 408 (when it
sent part of a request) and the connection is closed.

``skqk serve`` passes :func:`protocol_path` as uvicorn's ``http=``; the timeout is
``SKQK_HEADER_TIMEOUT_S``, read once per process.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from app.settings import get_settings

try:  # uvicorn's default where installed (uvicorn[standard])
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - the h11 protocol only
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

_MESSAGE = b"request headers not received in time (SKQK_HEADER_TIMEOUT_S)"
RESPONSE_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_MESSAGE), _MESSAGE))


class HeaderTimeoutMixin:
    """Put before a uvicorn HTTP protocol class; relies on its ``cycle`` / ``transport`` / ``loop``."""

    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    _header_timer: asyncio.TimerHandle | None = None
    _header_cycle: Any = None  # the last cycle whose headers were complete
    _header_bytes = False  # part of the next request has arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._header_timeout = get_settings().header_timeout_s
        self._header_timer = self.loop.call_later(self._header_timeout, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if not self._headers_started():
            cycle = self.cycle
            if cycle is None or cycle.response_complete:  # between requests: part of the next one
                self._header_bytes = True
                if self._header_timer is None and not self.transport.is_closing():
                    self._header_timer = self.loop.call_later(self._header_timeout, self._headers_too_slow)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._headers_started()  # a pipelined request buffered meanwhile may have started now

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def _headers_started(self) -> bool:
        """True (and the timer stopped) when a new request's headers are complete."""
        cycle = self.cycle
        if cycle is self._header_cycle:
            return False
        self._header_cycle = cycle
        self._header_bytes = False
        self._cancel_header_timer()
        return True

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport.is_closing() or transport.get_protocol() is not self:  # e.g. upgraded
            return
        if self._header_bytes:
            transport.write(RESPONSE_408)
        transport.close()


class H11HeaderTimeoutProtocol(HeaderTimeoutMixin, H11Protocol):
    pass


if HttpToolsProtocol is not None:

    class HttpToolsHeaderTimeoutProtocol(HeaderTimeoutMixin, HttpToolsProtocol):
        pass


def protocol_path() -> str:
    """What to pass as uvicorn's ``http=``: httptools when installed (uvicorn's own choice), else h11."""
    name = "HttpToolsHeaderTimeoutProtocol" if HttpToolsProtocol is not None else "H11HeaderTimeoutProtocol"
    return f"{__name__}:{name}"
