"""Single flight and fencing of the retrain task, on a real Redis and a real store.

The task function runs in this process here (called directly, not through a broker), so
each delivery scenario — duplicate, late, superseded — is exact and quick; the end-to-end
path through a real worker process is in test_distributed.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from app.distributed import GPU_QUEUE, LOCK_NAME, RetrainLock, redis_client
from app.retrain.celery_runner import CeleryRunner
from app.retrain.protocol import RetrainInProgress
from app.retrain.worker_presence import beat
from app.settings import get_settings
from app.storage import Store
from app.storage.schema import retrain_jobs
from app.storage.store import utcnow
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
    beat(client, [GPU_QUEUE], "fencing-test", 600)  # this process runs the task bodies: the worker
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
    from app.retrain.job import run_retrain_job

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
    from app.retrain.job import run_retrain_job

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


# ---- the SQL row decides: GETs only read, cancels are immediate, lost messages come back ------

def backdate(store: Store, job_id: str, seconds: float) -> None:
    """Make the job's last sign of life (publish or heartbeat) ``seconds`` old."""
    with store.engine.begin() as conn:
        conn.execute(update(retrain_jobs).where(retrain_jobs.c.job_id == job_id)
                     .values(updated_at=utcnow() - timedelta(seconds=seconds)))


def messages_for(client: redis.Redis, job_id: str) -> int:
    return sum(job_id in m for m in client.lrange(GPU_QUEUE, 0, -1))


def test_status_only_reads_even_when_redis_lost_the_lock(env):
    store, client = env
    runner = CeleryRunner(store, get_settings())
    queued = runner.submit("qk")
    client.flushdb()  # Redis restarted without persistence: lock and message gone
    assert runner.status(queued).status == "queued"
    store.update_job(queued, status="failed")  # make room for a running one
    store.create_job("job-run", "qk", runner="celery")
    assert store.start_job("job-run") is not None
    for _ in range(3):
        assert runner.status("job-run").status == "running"
    assert store.get_job("job-run").error is None


def test_submit_refuses_while_the_row_shows_a_live_job_without_the_lock(env):
    store, client = env
    runner = CeleryRunner(store, get_settings())
    store.create_job("job-live", "qk", runner="celery")
    store.start_job("job-live")  # running, fresh heartbeat; Redis has no lock (restarted)
    with pytest.raises(RetrainInProgress) as exc:
        runner.submit("qk")
    assert exc.value.job_id == "job-live"
    assert client.get(LOCK_NAME) is None
    assert [j.job_id for j in store.list_jobs()] == ["job-live"]
    backdate(store, "job-live", 6)  # no heartbeat for longer than the lease (5 s): dead
    new = runner.submit("qk")
    old = store.get_job("job-live")
    assert old.status == "failed" and old.error.startswith("worker lost")
    assert client.get(LOCK_NAME) == new


def test_cancel_of_a_queued_job_is_immediate_and_its_delivery_does_nothing(env):
    store, client = env
    runner = CeleryRunner(store, get_settings())
    job_id = runner.submit("qk")
    assert runner.cancel(job_id) == "cancelled"
    assert store.get_job(job_id).status == "cancelled"
    assert client.get(LOCK_NAME) is None
    assert runner.cancel(job_id) is None  # already finished
    versions = [v.version for v in store.list_versions()]
    assert run_task(job_id) == {"skipped": "job already cancelled"}
    assert [v.version for v in store.list_versions()] == versions
    assert runner.submit("qk") != job_id


def test_concurrent_deliveries_of_one_job_train_once(env):
    store, client = env
    assert RetrainLock(client, 30).acquire("job-busy")
    store.create_job("job-busy", "qk", runner="celery")
    store.update_job("job-busy", status="running")  # another delivery trains it right now
    versions = len(store.list_versions())
    assert run_task("job-busy") == {"skipped": "job already running"}
    assert len(store.list_versions()) == versions
    assert client.get(LOCK_NAME) == "job-busy"  # still the running delivery's
    client.delete(LOCK_NAME)

    # two deliveries racing for one queued job: the compare-and-set lets one of them train
    assert RetrainLock(client, 30).acquire("job-twice")
    store.create_job("job-twice", "qk", runner="celery")
    versions = len(store.list_versions())
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(run_task("job-twice"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trained = [r for r in results if "candidate_version" in r]
    assert len(trained) == 1, results
    assert len(store.list_versions()) == versions + 1
    assert store.get_job("job-twice").status == "succeeded"


def test_one_of_two_supervisors_republishes_a_lost_message(env):
    store, client = env
    first, second = (CeleryRunner(store, get_settings()) for _ in range(2))
    job_id = first.submit("qk")
    assert messages_for(client, job_id) == 1
    first.sweep()
    assert messages_for(client, job_id) == 1  # not due yet
    client.delete(GPU_QUEUE)  # a worker took the message and died before acking it
    backdate(store, job_id, 31)  # SKQK_RETRAIN_REPUBLISH_S is 30
    first.sweep()
    second.sweep()
    assert messages_for(client, job_id) == 1  # one replica re-sent it, the other saw the claim
    assert store.get_job(job_id).progress["delivery"] == {"published": 2, "republished": 1}
    backdate(store, job_id, 31)
    first.sweep()  # the message waits in the queue (no worker free): nothing to re-send
    assert messages_for(client, job_id) == 1
    assert store.get_job(job_id).progress["delivery"]["republished"] == 1
    assert client.get(LOCK_NAME) == job_id
    assert run_task(job_id)["promoted"]


def test_supervisor_fails_a_running_job_whose_heartbeat_stopped(env):
    store, client = env
    runner = CeleryRunner(store, get_settings())
    job_id = runner.submit("qk")
    client.delete(GPU_QUEUE)
    store.start_job(job_id)  # a worker started it, then died
    runner.sweep()
    assert store.get_job(job_id).status == "running"
    backdate(store, job_id, 6)  # older than the lease (5 s)
    runner.sweep()
    job = store.get_job(job_id)
    assert job.status == "failed" and job.error.startswith("worker lost"), job
    assert client.get(LOCK_NAME) is None
