"""Slow and large requests against a real ``skqk serve``: header and body read timeouts, and the
budget of in-flight body bytes (SKQK_HEADER_TIMEOUT_S, SKQK_BODY_TIMEOUT_S,
SKQK_MAX_INFLIGHT_BODY_BYTES). Timeouts are small here; each wait has a generous bound that
only a server without the limit (which keeps such connections forever) runs into."""

from __future__ import annotations

import json
import re
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.server import ServerProcess, copy_store, fast_env

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_BODY = 1024 * 1024
LARGE = 600 * 1024  # two fit in the budget, a third does not
BUDGET = 2 * LARGE + 100 * 1024
CLOSE_BOUND_S = 20.0  # far beyond the timeouts above; without them the connections stay open
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, template_data_dir: Path) -> Iterator[ServerProcess]:
    data_dir = copy_store(template_data_dir, tmp_path_factory.mktemp("limits"))
    env = fast_env(data_dir, SKQK_HEADER_TIMEOUT_S=HEADER_TIMEOUT_S, SKQK_BODY_TIMEOUT_S=BODY_TIMEOUT_S,
                   SKQK_MAX_BODY_BYTES=MAX_BODY, SKQK_MAX_INFLIGHT_BODY_BYTES=BUDGET,
                   SKQK_BODY_BUDGET_WAIT_S=0.3)
    with ServerProcess(data_dir, env) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def _digits(n: int, offset: int = 0) -> tuple[list[list[float]], list[int]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data[offset:offset + n] / 16.0).astype(np.float32)
    return x.tolist(), d.target[offset:offset + n].tolist()


def _ingest_body(offset: int, size: int | None = None) -> bytes:
    """A valid /ingest body of 3 rows, padded with JSON whitespace to exactly ``size`` bytes."""
    x, y = _digits(3, offset)
    body = json.dumps({"samples": [{"features": f, "label": lab} for f, lab in zip(x, y, strict=True)]})
    return body.encode() if size is None else body.encode().ljust(size, b" ")


def _predict_ok(client: httpx.Client) -> None:
    x, _ = _digits(2)
    r = client.post("/predict", json={"inputs": x})
    assert r.status_code == 200, r.text


def _connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection; AssertionError if it never does."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout}s; got {data[:200]!r}") from None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (headers + Content-Length bytes) from a kept-alive connection."""
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _content_length(data):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    return data


def _content_length(data: bytes) -> int:
    m = re.search(rb"\r\ncontent-length: (\d+)\r\n", data, re.IGNORECASE)
    return int(m.group(1)) if m else 0


def _status(response: bytes) -> int:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert m, response[:200]
    return int(m.group(1))


def _metric(client: httpx.Client, name: str) -> float | None:
    m = re.search(rf"^{name} (\S+)$", client.get("/metrics").text, re.MULTILINE)
    return float(m.group(1)) if m else None


def _send_request(sock: socket.socket, path: str, body: bytes, sent: int) -> None:
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:sent])


# ---- header timeout ---------------------------------------------------------------------------
def test_slow_header_senders_are_disconnected(server: ServerProcess, client: httpx.Client) -> None:
    drippers = [_connect(server) for _ in range(6)]
    for s in drippers:
        s.sendall(b"POST /ingest HTTP/1.1\r\nHost: t\r\n")
    idle = _connect(server)  # connects and never sends a byte
    kept = _connect(server)  # one full request, then a slow second one on the same connection
    kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
    first = _read_response(kept)
    assert _status(first) == 200 and b'"live":true' in first
    kept.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
    drippers.append(kept)

    # one header byte every 0.2 s (each byte also cancels uvicorn's own keep-alive timer)
    closed: dict[int, bytes] = {}
    deadline = time.monotonic() + CLOSE_BOUND_S
    while len(closed) < len(drippers) and time.monotonic() < deadline:
        for i, s in enumerate(drippers):
            if i in closed:
                continue
            if select.select([s], [], [], 0)[0]:
                closed[i] = _read_until_closed(s, 5)
                continue
            try:
                s.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                closed[i] = _read_until_closed(s, 5)
        _predict_ok(client)  # normal requests go on meanwhile
        time.sleep(0.2)
    assert len(closed) == len(drippers), "slow-header connections still open (no header timeout)"
    for response in closed.values():  # a partly sent request is told why
        assert _status(response) == 408 and b"SKQK_HEADER_TIMEOUT_S" in response
    assert _read_until_closed(idle, CLOSE_BOUND_S) == b""  # closed without a word
    for s in (*drippers, idle):
        s.close()
    _predict_ok(client)


# ---- body timeout -----------------------------------------------------------------------------
def test_slow_body_gets_408_and_the_connection_is_closed(server: ServerProcess, client: httpx.Client) -> None:
    before = client.get("/samples/count").json()["total"]
    body = _ingest_body(0)
    with _connect(server) as s:
        _send_request(s, "/ingest", body, 10)
        # one body byte every 0.2 s: fresh bytes keep arriving, the whole body never does in time
        deadline = time.monotonic() + CLOSE_BOUND_S
        sent = 10
        while not select.select([s], [], [], 0.2)[0]:
            assert time.monotonic() < deadline, "slow body still being read (no body timeout)"
            s.sendall(body[sent:sent + 1])
            sent += 1
        response = _read_until_closed(s, 5)
    assert _status(response) == 408
    error = json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]
    assert "request body not received within" in error and "SKQK_BODY_TIMEOUT_S" in error
    assert client.get("/samples/count").json()["total"] == before  # nothing stored
    _predict_ok(client)


# ---- in-flight body budget ----------------------------------------------------------------------
def test_large_bodies_beyond_the_budget_get_503_and_store_nothing(server: ServerProcess,
                                                                   client: httpx.Client) -> None:
    before = client.get("/samples/count").json()["total"]
    held = [_ingest_body(10 + 3 * i, LARGE) for i in range(2)]
    socks = [_connect(server) for _ in held]
    for s, body in zip(socks, held, strict=True):  # headers + 1 KiB: each reserves its whole size
        _send_request(s, "/ingest", body, 1024)
    started = time.monotonic()
    while (counted := _metric(client, "skqk_request_body_bytes_in_flight") or 0) < 2 * LARGE:
        assert time.monotonic() < started + 30, f"the two large bodies were never counted ({counted})"
        time.sleep(0.05)

    third = _ingest_body(20, LARGE)
    r = client.post("/ingest", content=third, headers=JSON)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert "SKQK_MAX_INFLIGHT_BODY_BYTES" in r.json()["error"]
    assert client.get("/samples/count").json()["total"] == before  # refused: nothing stored

    _predict_ok(client)  # small bodies are not held back by the budget
    small = client.post("/ingest", content=_ingest_body(30), headers=JSON)
    assert small.status_code == 200, small.text

    for s, body in zip(socks, held, strict=True):  # the held bodies complete and are stored
        s.sendall(body[1024:])
    for s in socks:
        response = _read_response(s)
        assert _status(response) == 200, response[:300]
        s.close()
    assert client.get("/samples/count").json()["total"] == before + 9
    deadline = time.monotonic() + 30
    while _metric(client, "skqk_request_body_bytes_in_flight") != 0:  # all given back
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = client.post("/ingest", content=third, headers=JSON)  # fits now
    assert r.status_code == 200, r.text
    assert client.get("/samples/count").json()["total"] == before + 12
