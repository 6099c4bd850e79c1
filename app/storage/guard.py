"""Client-side bounds on store calls: a database that stops answering must not hang a caller.

Server-side limits (Postgres ``statement_timeout``) do nothing when the server process is
frozen, and on an established connection libpq waits for an answer forever (the kernel
still ACKs what is sent, so TCP keepalives and ``tcp_user_timeout`` see nothing wrong).
So, on libpq engines (psycopg):

- a caller that must not hang (a request handler, the active-version poll, a health probe)
  sets a *call timeout* in its context (``set_call_timeout``); ``asyncio.to_thread`` and
  ``run_in_threadpool`` copy the context into the worker thread;
- a pool checkout made under a call timeout is registered with one watchdog thread, and the
  connection is pinged inside that window (this replaces ``pool_pre_ping``, whose ping runs
  before any hook could bound it);
- a checkout that outlives its deadline gets its socket shut down by the watchdog: the blocked
  libpq call fails at once, the connection is invalidated, and the caller sees SQLAlchemy's
  ``OperationalError`` (a ``DBAPIError``) whose ``orig`` is a ``StoreTimeout``; the thread is
  free again, so nothing piles up while the store hangs;
- opening a connection under a call timeout waits at most the smaller of the two bounds.

Background work (retrains, workers, migrations) sets no call timeout: only the server-side
statement timeout bounds it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import URL
from sqlalchemy.engine.interfaces import ExceptionContext
from sqlalchemy.exc import DisconnectionError, OperationalError

from app.settings import Settings, get_settings

log = logging.getLogger("skqk.storage")

LIBPQ_DRIVERS = frozenset({"psycopg", "psycopg2"})
_call_timeout: ContextVar[float | None] = ContextVar("skqk_store_call_timeout", default=None)
_KILLED = "skqk_killed"  # connection info: the watchdog shut it down (value: the timeout)
_FRESH = "skqk_fresh"  # connection info: just opened, no ping needed


class StoreTimeout(Exception):
    """The store gave no answer within the caller's call timeout."""


@dataclass(frozen=True)
class StoreTimeouts:
    connect_s: float = 5.0  # opening a connection
    statement_s: float = 30.0  # server side (Postgres statement_timeout, SQLite busy timeout); 0: none
    pool_s: float = 5.0  # waiting for a free pooled connection
    call_s: float = 5.0  # what serving callers pass to set_call_timeout

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> StoreTimeouts:
        s = settings or get_settings()
        return cls(s.db_connect_timeout_s, s.db_statement_timeout_s, s.db_pool_timeout_s, s.store_timeout_s)


def set_call_timeout(seconds: float | None) -> None:
    """Bound the store calls of this context (a task, or a thread started from it)."""
    _call_timeout.set(seconds)


@contextlib.contextmanager
def call_timeout(seconds: float | None) -> Iterator[None]:
    token = _call_timeout.set(seconds)
    try:
        yield
    finally:
        _call_timeout.reset(token)


def timed_out(seconds: float) -> OperationalError:
    """The error a store call under a call timeout raises when the store does not answer."""
    return OperationalError(None, None, StoreTimeout(f"no answer within {seconds:g} s"))


def connect_seconds(seconds: float) -> int:
    return max(2, math.ceil(seconds))  # libpq's connect_timeout: whole seconds, 2 at least


def libpq_connect_args(url: URL, t: StoreTimeouts) -> dict[str, Any]:
    """connect_timeout, statement_timeout and TCP keepalives (a dead peer or network)."""
    args: dict[str, Any] = {"connect_timeout": connect_seconds(t.connect_s), "keepalives": 1,
                            "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                            "tcp_user_timeout": 15_000}  # ms of unacknowledged data: a dead link
    if t.statement_s > 0:
        ours = f"-c statement_timeout={int(t.statement_s * 1000)}"
        given = url.query.get("options")
        args["options"] = f"{given} {ours}" if isinstance(given, str) and given else ours
    return args


@dataclass
class _Watch:
    deadline: float
    timeout: float
    dbapi_connection: Any
    fd: int
    info: dict[str, Any]


class _Watchdog:
    """One daemon thread that shuts down connections whose checkout outlived its deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: dict[int, _Watch] = {}
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    def watch(self, key: int, w: _Watch) -> None:
        with self._cond:
            self._watches[key] = w
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="skqk-store-watchdog", daemon=True)
                self._thread.start()
            elif w.deadline < self._wake_at:
                self._cond.notify()  # sleeping past this deadline: wake up earlier

    def unwatch(self, key: int) -> None:
        with self._cond:
            self._watches.pop(key, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for key, w in list(self._watches.items()):
                    if w.deadline <= now:
                        del self._watches[key]
                        _shut_down(w)  # under the lock: unwatch() (before close) cannot race it
                self._wake_at = min((w.deadline for w in self._watches.values()), default=math.inf)
                self._cond.wait(None if self._wake_at == math.inf else self._wake_at - now)


def _shut_down(w: _Watch) -> None:
    w.info[_KILLED] = w.timeout
    try:
        if w.dbapi_connection.closed or w.dbapi_connection.fileno() != w.fd:
            return
        with socket.socket(fileno=os.dup(w.fd)) as sock:  # a duplicate: the driver's fd stays its own
            sock.shutdown(socket.SHUT_RDWR)
    except Exception as exc:  # never let the watchdog die
        log.warning("could not shut down a hung store connection: %s", exc)
        return
    log.warning("the store gave no answer within %g s: connection shut down", w.timeout)


_watchdog = _Watchdog()
# a forked child (Celery prefork) inherits no thread: start over with a fresh watchdog
os.register_at_fork(after_in_child=lambda: globals().update(_watchdog=_Watchdog()))


def install_guard(engine: Engine, t: StoreTimeouts) -> None:
    """Guard a libpq engine; create it without ``pool_pre_ping`` (the checkout pings here)."""

    @event.listens_for(engine, "do_connect")
    def _bounded_connect(_dialect: Any, _rec: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        call = _call_timeout.get()
        if call is not None:
            cparams["connect_timeout"] = connect_seconds(min(t.connect_s, call))

    @event.listens_for(engine, "connect")
    def _opened(_dbapi_conn: Any, rec: Any) -> None:
        rec.info[_FRESH] = True

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, rec: Any, _proxy: Any) -> None:
        rec.info.pop(_KILLED, None)
        call = _call_timeout.get()
        key = id(rec)
        if call is not None:
            _watchdog.watch(key, _Watch(time.monotonic() + call, call, dbapi_conn, dbapi_conn.fileno(),
                                        rec.info))
        if rec.info.pop(_FRESH, False):
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            _watchdog.unwatch(key)
            if call is not None and _KILLED in rec.info:
                raise timed_out(call) from exc  # out of time: the pool invalidates it, no retry
            raise DisconnectionError(f"stale connection ({type(exc).__name__})") from exc  # reconnect

    def _release(_dbapi_conn: Any, rec: Any, *_: Any) -> None:
        _watchdog.unwatch(id(rec))  # before the pool closes the connection

    event.listen(engine, "checkin", _release)
    event.listen(engine, "invalidate", _release)
    event.listen(engine, "close", _release)

    @event.listens_for(engine, "handle_error")
    def _killed(ctx: ExceptionContext) -> OperationalError | None:
        try:
            info = ctx.connection.info if ctx.connection is not None else None
        except Exception:
            return None
        if not info or _KILLED not in info:
            return None
        ctx.is_disconnect = True  # never back into the pool
        return timed_out(info[_KILLED])
