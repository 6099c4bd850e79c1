from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.storage import Store
from tests.helpers.server import ServerProcess, copy_store, fast_env

SMALL_BODY_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory, template_data_dir: Path) -> Iterator[ServerProcess]:
    """One real ``skqk serve`` for a whole module (a copy of the bootstrapped template)."""
    data_dir = copy_store(template_data_dir, tmp_path_factory.mktemp("api"))
    server = ServerProcess(data_dir, fast_env(data_dir, SKQK_MAX_BODY_BYTES=SMALL_BODY_LIMIT))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(api_server: ServerProcess) -> Iterator[httpx.Client]:
    with api_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def server_store(api_server: ServerProcess) -> Iterator[Store]:
    """The server's own store, opened from the test (to check what was or was not stored)."""
    store = Store(f"sqlite:///{api_server.data_dir / 'skqk.db'}")
    yield store
    store.dispose()
