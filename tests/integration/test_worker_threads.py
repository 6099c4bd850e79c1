"""A Celery retrain worker applies SKQK_RETRAIN_THREADS in its pool child (as the embedded runner
does): the job result says the thread count its floats were computed with."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from celery import Celery
from sklearn.datasets import load_digits

from app.distributed import GPU_QUEUE, RETRAIN_TASK
from app.storage import Store
from tests.integration.conftest import initialised_deployment, wait_until

pytestmark = pytest.mark.integration

DIGITS = load_digits()


def test_worker_runs_retrains_at_the_configured_threads(tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = tmp_path_factory.mktemp("threads")
    with initialised_deployment(workdir, "skqk_threads", 2, SKQK_PROMOTION_TOLERANCE=1.0) as dep:
        store = Store(dep.env["SKQK_DATABASE_URL"])
        try:
            store.ingest((DIGITS.data[:50] / 16.0).astype(np.float32), DIGITS.target[:50])
            dep.start_worker(SKQK_RETRAIN_THREADS="2")  # not the default (1), not the core count
            results = []
            for _ in range(2):  # each retrain in a fresh pool child (max_tasks_per_child=1)
                job_id = f"threads-{uuid.uuid4().hex[:8]}"
                store.create_job(job_id, "qk", "celery")
                Celery(broker=dep.redis.url, backend=dep.redis.url).send_task(
                    RETRAIN_TASK, args=[job_id, "qk"], queue=GPU_QUEUE)
                job = wait_until(lambda j=job_id: (r := store.get_job(j)) is not None and r.finished and r,
                                 180, 0.2, what=f"job {job_id}")
                assert job.status == "succeeded", (job.error, dep.workers[0].log())
                results.append(job.result)
                store.activate(job.result["champion_version"], "test", "same champion again")
            assert [r["torch_threads"] for r in results] == [2, 2]
            # same champion, same data, same threads: the same readout, bit for bit
            a, b = (store.get_version(r["candidate_version"], weights=False) for r in results)
            assert a.estimator_sha256 == b.estimator_sha256
        finally:
            store.dispose()
