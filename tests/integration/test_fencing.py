"""Single flight and fencing of the retrain task, on a real Redis and a real store.

The task function runs in this process here (called directly, not through a broker), so
each delivery scenario — duplicate, late, superseded — is exact and quick; the end-to-end
path through a real worker process is in test_distributed.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.distributed import LOCK_NAME, RetrainLock, redis_client
from app.serving.celery_runner import CeleryRunner
from app.serving.runner import RetrainInProgress
from app.settings import get_settings
from app.storage import Store
from tests.conftest import fast_settings
from tests.helpers.server import copy_store
from tests.integration.conftest import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def env(redis_server: RedisServer, template_data_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Store, redis.Redis]]:
    data_dir = copy_store(template_data_dir, tmp_path / "data")
    settings = fast_settings(data_dir, redis_url=redis_server.url, retrain_lease_s=5)
    for key, value in settings.model_dump().items():
        if value is not None:
            monkeypatch.setenv(f"SKQK_{key.upper()}", str(value))
    get_settings.cache_clear()
    client = redis_client(redis_server.url)
    client.flushdb()
    store = Store(settings.resolved_database_url)
    yield store, client
    store.dispose()
    get_settings.cache_clear()


def run_task(job_id: str, mode: str = "qk") -> dict:
    from workers.tasks import retrain

    return retrain(job_id, mode)  # a direct call runs the task body here


def test_runner_is_single_flight_and_the_lock_names_the_job(env):
    store, client = env
    runner = CeleryRunner(store, get_settings())
    first = runner.submit("qk")
    assert client.get(LOCK_NAME) == first
    with pytest.raises(RetrainInProgress) as exc:
        runner.submit("qk")
    assert exc.value.job_id == first
    assert store.get_job(first).status == "queued"


def test_duplicate_delivery_promotes_once(env):
    store, client = env
    lock = RetrainLock(client, 30)
    assert lock.acquire("job-dup")
    store.create_job("job-dup", "qk", runner="celery")
    before = store.active_version()
    first = run_task("job-dup")
    assert first["promoted"] and store.active_version() == first["candidate_version"] != before
    versions = [v.version for v in store.list_versions()]
    second = run_task("job-dup")  # the broker delivers the same message again
    assert second == {"skipped": "job already succeeded"}
    assert [v.version for v in store.list_versions()] == versions
    assert client.get(LOCK_NAME) is None  # released by the first delivery


def test_delivery_whose_lock_belongs_to_another_job_does_nothing(env):
    store, client = env
    lock = RetrainLock(client, 30)
    assert lock.acquire("job-new")  # the lock expired for job-old and job-new took it
    store.create_job("job-old", "qk", runner="celery")
    versions = [v.version for v in store.list_versions()]
    result = run_task("job-old")
    assert result == {"skipped": "lock no longer held for this job"}
    job = store.get_job("job-old")
    assert job.status == "failed" and "worker lost" in job.error
    assert [v.version for v in store.list_versions()] == versions
    assert client.get(LOCK_NAME) == "job-new"  # not released by the stale delivery


def test_worker_that_loses_the_lock_while_training_does_not_promote(env):
    store, client = env
    from app.serving.retrain_job import run_retrain_job

    lock = RetrainLock(client, 30)
    assert lock.acquire("job-a")
    lock.adopt("job-a")
    store.create_job("job-a", "qk", runner="celery")
    before = store.active_version()
    client.set(LOCK_NAME, "job-b")  # the lock moved on (expired, taken by job-b)
    result = run_retrain_job(store, get_settings(), "job-a", "qk", fence=lock.owned)
    assert not result["promoted"] and "lost the retrain lock" in result["reason"]
    assert store.active_version() == before
    assert store.get_version(result["candidate_version"], weights=False) is not None  # kept, inactive


def test_stale_champion_is_not_overwritten(env):
    store, _client = env
    from app.serving.retrain_job import run_retrain_job

    store.create_job("job-stale", "qk", runner="celery")
    champion = store.active_version()

    def newer_promotion_lands_meanwhile() -> bool:
        # Another job promoted a newer version while this one trained.
        newer = store.register_version(**_copy_of(store, champion))
        store.compare_and_set_active(newer, champion, actor="other", reason="newer")
        return True

    result = run_retrain_job(store, get_settings(), "job-stale", "qk", fence=newer_promotion_lands_meanwhile)
    assert not result["promoted"] and "stale champion" in result["reason"]
    assert store.active_version() != result["candidate_version"]


def _copy_of(store: Store, version: int) -> dict:
    rec = store.get_version(version)
    return {"architecture": rec.architecture, "selector_weights": rec.selector_weights,
            "estimator_weights": rec.estimator_weights, "mode": "qk", "parent": version,
            "metrics": {}, "data_watermark": rec.data_watermark}
