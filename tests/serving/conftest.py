from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import Settings
from app.storage import Store
from app.storage.schema import metadata
from tests.conftest import bootstrap_into, fast_settings
from tests.helpers.server import copy_store


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return fast_settings(tmp_path / "data")


@pytest.fixture
def sqlite_store(template_data_dir: Path, settings: Settings) -> Iterator[Store]:
    """A copy of the bootstrapped template store (digits samples + version 1 active)."""
    copy_store(template_data_dir, settings.data_dir)
    store = Store(settings.resolved_database_url)
    yield store
    store.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def served_store(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Store]:
    """A bootstrapped store (version 1 active) on each backend."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_store")
        return
    store = Store(request.getfixturevalue("pg_database_url"))
    metadata.drop_all(store.engine)
    store.create_schema()
    bootstrap_into(store, settings)
    yield store
    store.dispose()
