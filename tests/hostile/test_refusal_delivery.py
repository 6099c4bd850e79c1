"""A refused body still gets its answer (issue 20, item 7): a body over SKQK_MAX_BODY_BYTES
(413) or one that does not fit the in-flight budget (503) must reach an ordinary client as
that status, never as a connection reset because the server closed with the body unread.
Real ``skqk serve``; the client is a plain socket that sends its whole request, then reads
(what many HTTP clients do; httpx alone retries the read after a failed write). Before the
fix the send failed with ECONNRESET at ~4 MB: the server closed with the body unread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.server import ServerProcess, copy_store, fast_env

MAX_BODY = 4 * 1024 * 1024
BUDGET = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, template_data_dir: Path) -> Iterator[ServerProcess]:
    data_dir = copy_store(template_data_dir, tmp_path_factory.mktemp("refusals"))
    env = fast_env(data_dir, SKQK_MAX_BODY_BYTES=MAX_BODY, SKQK_MAX_INFLIGHT_BODY_BYTES=BUDGET,
                   SKQK_BODY_BUDGET_WAIT_S=0.2, SKQK_BODY_TIMEOUT_S=20)
    with ServerProcess(data_dir, env) as s:
        yield s


def _post(server: ServerProcess, size: int) -> tuple[int, bytes]:
    """Send a whole /ingest request of ``size`` body bytes, then read the answer: (status, response)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {size}\r\n\r\n".encode())
        chunk = b" " * 65536
        for start in range(0, size, len(chunk)):  # ConnectionResetError here: the old behaviour
            s.sendall(chunk[:size - start])
        response = b""
        while data := s.recv(65536):
            response += data
    return int(response.split(b" ", 2)[1]), response


def test_oversized_bodies_get_413_not_a_reset(server: ServerProcess) -> None:
    for size in (5 * 1024 * 1024, 24 * 1024 * 1024) * 3:
        status, response = _post(server, size)
        assert status == 413, response[:300]
        assert b"SKQK_MAX_BODY_BYTES" in response


def test_bodies_over_the_in_flight_budget_get_503_not_a_reset(server: ServerProcess) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    holder = socket.create_connection((host, int(port)))
    stop = threading.Event()
    try:  # holds 4 MiB of the 5 MiB budget: headers sent, body trickling
        held = MAX_BODY
        holder.sendall(f"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {held}\r\n\r\n".encode())

        def trickle() -> None:
            while not stop.wait(0.5):
                holder.sendall(b" ")

        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(0.5)
        for _ in range(6):
            status, response = _post(server, 3 * 1024 * 1024)
            assert status == 503, response[:300]
            assert b"retry-after: 1" in response.lower()
    finally:
        stop.set()
        holder.close()
