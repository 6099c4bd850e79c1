"""The sharded QK feature pass (Celery group across two real workers) gives exactly the
candidate one process computes alone."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from celery import Celery
from sklearn.datasets import load_digits

from app.distributed import GPU_QUEUE, RETRAIN_TASK
from app.retrain.job import run_retrain_job
from app.storage import Store
from tests.conftest import fast_settings
from tests.integration.conftest import initialised_deployment, wait_until

pytestmark = pytest.mark.integration

DIGITS = load_digits()


def test_two_workers_share_the_feature_pass_and_match_one(tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = tmp_path_factory.mktemp("sharded")
    shared_cache = workdir / "features"
    with initialised_deployment(workdir, "skqk_shard", 2, SKQK_RETRAIN_LEASE_S=30,
                                SKQK_RETRAIN_MEMORY_MB=1, SKQK_RETRAIN_SHARDS=2,
                                SKQK_FEATURE_CACHE_DIR=shared_cache, SKQK_PROMOTION_TOLERANCE=1.0) as dep:
        store = Store(dep.env["SKQK_DATABASE_URL"])
        rng = np.random.default_rng(0)
        rows = rng.integers(0, len(DIGITS.target), 60_000)
        noisy = (DIGITS.data[rows] / 16.0 + rng.normal(0, 0.05, (len(rows), 64))).astype(np.float32)
        store.ingest(noisy, DIGITS.target[rows])  # ~62k ids: 61 blocks of 1,024 ids at 1 MiB
        dep.start_worker()
        dep.start_worker()

        job_id = f"sharded-{uuid.uuid4().hex[:8]}"
        store.create_job(job_id, "qk", "celery")
        client = Celery(broker=dep.redis.url, backend=dep.redis.url)
        client.send_task(RETRAIN_TASK, args=[job_id, "qk"], queue=GPU_QUEUE)
        job = wait_until(lambda: (j := store.get_job(job_id)) is not None and j.finished and j, 240, 0.2,
                         what=f"sharded job {job_id}")
        assert job.status == "succeeded", (job.error, dep.workers[0].log(), dep.workers[1].log())
        sharded = job.result
        cache = sharded["feature_cache"]
        assert cache["blocks_computed"] >= 60 and cache["rows_computed"] == sharded["n_samples"]
        assert len(cache["workers"]) >= 2, cache  # the other worker's shard task computed blocks too
        assert any("feature shard of version" in w.log() for w in dep.workers)

        # the same job in one process, on a cold cache of its own, from the same champion and data
        store.activate(sharded["champion_version"], "test", "back to the champion")
        settings = fast_settings(workdir / "alone", database_url=dep.env["SKQK_DATABASE_URL"],
                                 retrain_memory_mb=1, feature_cache_dir=workdir / "alone-features")
        alone_id = f"alone-{uuid.uuid4().hex[:8]}"
        store.create_job(alone_id, "qk", "test")
        # float sums depend on the thread count: compute at the workers' (SKQK_RETRAIN_THREADS)
        threads = torch.get_num_threads()
        assert sharded["torch_threads"] == int(dep.env["SKQK_RETRAIN_THREADS"])
        torch.set_num_threads(sharded["torch_threads"])
        try:
            alone = run_retrain_job(store, settings, alone_id, "qk")
        finally:
            torch.set_num_threads(threads)
        assert alone["feature_cache"]["blocks_computed"] == cache["blocks_computed"]
        assert alone["data_watermark"] == sharded["data_watermark"]
        assert alone["n_samples"] == sharded["n_samples"]
        a = store.get_version(sharded["candidate_version"], weights=False)
        b = store.get_version(alone["candidate_version"], weights=False)
        assert a.estimator_sha256 == b.estimator_sha256  # bit-identical readout
        assert sharded["candidate"] == alone["candidate"]
        assert Path(shared_cache).is_dir()
        store.dispose()
