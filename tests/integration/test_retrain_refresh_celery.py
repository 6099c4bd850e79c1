"""``mode=auto`` → refresh on a Celery worker (real Redis, Postgres, worker and replica): the
worker runs the refresh, the gate decides, and a promoted refresh reaches the replica."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.helpers.server import ServerProcess
from tests.integration.conftest import Deployment, admin_headers, initialised_deployment, wait_until

pytestmark = pytest.mark.integration

DIGITS = load_digits()
BRIGHT = np.clip(DIGITS.data / 16.0 + 0.4, 0.0, 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("refresh-celery")
    with initialised_deployment(workdir, "skqk_refresh", 6, SKQK_RETRAIN_QUEUE_TIMEOUT_S=120) as dep:
        replica = ServerProcess(workdir / "replica", dict(dep.env))
        dep.replicas.append(replica)
        replica.start(ready_timeout=120)
        dep.start_worker()
        yield dep


def test_auto_refresh_runs_on_a_worker(deployment: Deployment) -> None:
    (replica,) = deployment.replicas
    with replica.client() as c:
        samples = [{"features": BRIGHT[i].tolist(), "label": int(DIGITS.target[i])} for i in range(300)]
        assert c.post("/ingest", json={"samples": samples}).status_code == 200
        r = c.post("/retrain", json={}, headers=admin_headers())
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]

        def finished() -> dict | None:
            job = c.get(f"/retrain/{job_id}").json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        job = wait_until(finished, 300, 0.2, what=f"job {job_id} to finish")
        assert job["status"] == "succeeded", job
        result = job["result"]
        assert job["runner"] == "celery" and result["mode"] == "refresh", result["mode_reason"]
        assert result["refresh"]["layers"][0] == 0 and "inputs shifted" in result["mode_reason"]
        if result["promoted"]:
            def swapped() -> bool:
                out = c.post("/predict", json={"inputs": BRIGHT[:2].tolist()}).json()
                return out["model_version"] == result["candidate_version"]

            wait_until(swapped, 60, 0.3, what="the replica to serve the refreshed version")
        else:
            assert "rejected by the gate" in result["reason"]
