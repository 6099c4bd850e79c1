"""Shared fixtures: stores on SQLite and PostgreSQL, a bootstrapped template store, servers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from app.storage import Store, open_store
from app.storage.schema import metadata
from tests.helpers.pg import temporary_database
from tests.helpers.server import FAST_ENV, ServerProcess, copy_store, fast_env


def fast_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings matching the test servers' environment (digits, small MLP, few epochs)."""
    values: dict[str, Any] = {k[len("SKQK_"):].lower(): v for k, v in FAST_ENV.items()}
    values.update(data_dir=data_dir, database_url=None, redis_url=None)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped at the end.

    Needs the Postgres of the CI machine (127.0.0.1:5432); set SKQK_TEST_POSTGRES=skip to
    skip the Postgres variants on a machine without one.
    """
    if os.environ.get("SKQK_TEST_POSTGRES") == "skip":
        pytest.skip("SKQK_TEST_POSTGRES=skip")
    with temporary_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An empty store with the schema, on each backend."""
    if request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path / 'skqk.db'}")
    else:
        s = Store(request.getfixturevalue("pg_database_url"))
        metadata.drop_all(s.engine)
        s.create_schema()
    yield s
    s.dispose()


def bootstrap_into(store: Store, settings: Settings) -> int:
    from app.intake.bootstrap import bootstrap_version

    return bootstrap_version(store, settings).version


@pytest.fixture(scope="session")
def template_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir whose SQLite store holds digits + a trained version 1 (copy it, never mutate)."""
    data_dir = tmp_path_factory.mktemp("template")
    settings = fast_settings(data_dir)
    s = open_store(settings.resolved_database_url)
    bootstrap_into(s, settings)
    with s.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    s.dispose()
    return data_dir


@pytest.fixture
def bootstrapped_dir(template_data_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the template data dir."""
    return copy_store(template_data_dir, tmp_path / "data")


ServerFactory = Callable[..., ServerProcess]


@pytest.fixture
def server_factory(tmp_path: Path, template_data_dir: Path) -> Iterator[ServerFactory]:
    """``start(data_dir=None, fresh=False, **SKQK_overrides)`` → a running ``skqk serve``.

    By default the server gets a copy of the bootstrapped template store; ``fresh=True``
    starts on an empty data dir (the server bootstraps itself). Stopped at teardown.
    """
    servers: list[ServerProcess] = []

    def start(data_dir: Path | None = None, fresh: bool = False, **overrides: Any) -> ServerProcess:
        if data_dir is None:
            data_dir = tmp_path / f"data{len(servers)}"
            if not fresh:
                copy_store(template_data_dir, data_dir)
        env = fast_env(data_dir, **{f"SKQK_{k.upper()}": v for k, v in overrides.items()})
        server = ServerProcess(data_dir, env)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
