"""Sample administration over real HTTP (one uvicorn process for the module): a poison batch
ingested under a key is quarantined by that key and the next retrains leave it out; deletes
keep the key taken; every action is in the audit trail; bad requests are 4xx and change nothing."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from app.core.splits import split_masks
from app.storage import Store
from tests.helpers.server import API_KEY, ServerProcess, wait_job

ADMIN = {"X-API-Key": API_KEY}
D = 64
HOLDOUT_MODULO = 10  # the servers' default SKQK_HOLDOUT_MODULO


def _ingest(client: httpx.Client, rows: np.ndarray, labels: list[int], key: str) -> dict[str, Any]:
    r = client.post("/ingest", json={"samples": [{"features": f.tolist(), "label": label}
                                                 for f, label in zip(rows, labels, strict=True)],
                                     "idempotency_key": key})
    assert r.status_code == 200, r.text
    return r.json()


def _count(client: httpx.Client) -> int:
    r = client.get("/samples/count")  # public: no key
    assert r.status_code == 200, r.text
    return int(r.json()["total"])


def _all_rows(client: httpx.Client, **filters: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    after: int | None = None
    while True:
        params = {**filters, "limit": 1000, **({"after_id": after} if after is not None else {})}
        r = client.get("/samples", params=params, headers=ADMIN)
        assert r.status_code == 200, r.text
        rows += r.json()["samples"]
        after = r.json()["next_after_id"]
        if after is None:
            return rows


def _audit(client: httpx.Client, **params: Any) -> dict[str, Any]:
    r = client.get("/samples/audit", params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def _retrain(client: httpx.Client, mode: str) -> dict[str, Any]:
    r = client.post("/retrain", json={"mode": mode, "force": True}, headers=ADMIN)  # quarantined: not new
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"], timeout=300)
    assert job["status"] == "succeeded", job
    return job["result"]


def test_a_quarantined_poison_batch_is_out_of_qk_and_full_retrains(
        client: httpx.Client, api_server: ServerProcess) -> None:
    before = _count(client)
    poison = np.full((40, D), 1e30, np.float32)  # finite float32, far outside anything trained on
    assert _ingest(client, poison, [0] * 40, "poison-2026-12-01")["total_samples"] == before + 40
    assert _count(client) == before + 40

    r = client.post("/samples/quarantine", headers=ADMIN,
                    json={"ingest_key": "poison-2026-12-01", "reason": "1e30 outliers", "actor": "alice"})
    assert r.status_code == 200, r.text
    assert r.json()["action"] == "quarantine" and r.json()["affected"] == 40
    audit_id = r.json()["audit_id"]
    assert _count(client) == before  # /samples/count: what retrains use
    metrics = client.get("/metrics").text
    assert f"skqk_samples_total {float(before)}" in metrics

    listed = _all_rows(client, ingest_key="poison-2026-12-01")
    assert len(listed) == 40
    assert all(s["quarantined"] and s["quarantine_reason"] == "1e30 outliers"
               and s["quarantine_audit_id"] == audit_id and s["quarantined_at"] for s in listed)
    poison_ids = np.array([s["id"] for s in listed])
    kept_ids = np.array([s["id"] for s in _all_rows(client, quarantined="false")])
    assert len(kept_ids) == before and not set(poison_ids) & set(kept_ids)
    # the check below can tell: some poison ids would land in the holdout if they were loaded
    assert split_masks(poison_ids, HOLDOUT_MODULO).holdout.any()
    expected_holdout = int(split_masks(kept_ids, HOLDOUT_MODULO).holdout.sum())

    for mode in ("qk", "full"):
        result = _retrain(client, mode)
        assert result["data_watermark"] >= poison_ids.max()  # the poison was inside the snapshot …
        assert result["n_samples"] == before  # … and left out of training, validation and holdout
        assert result["n_holdout"] == expected_holdout
        assert result["n_train"] + result["n_val"] + result["n_holdout"] == before
        assert np.isfinite(result["candidate"]["holdout_acc"])

    # released, the rows count again (and are listed as such)
    r = client.post("/samples/release", headers=ADMIN, json={"ingest_key": "poison-2026-12-01"})
    assert r.status_code == 200 and r.json()["affected"] == 40
    assert _count(client) == before + 40
    assert not any(s["quarantined"] for s in _all_rows(client, ingest_key="poison-2026-12-01"))
    r = client.post("/samples/quarantine", headers=ADMIN, json={"from_id": int(poison_ids.min()),
                                                                "to_id": int(poison_ids.max())})
    assert r.json()["affected"] == 40 and _count(client) == before


def test_delete_by_key_keeps_a_retried_ingest_a_no_op(client: httpx.Client) -> None:
    rows = np.random.default_rng(3).random((6, D), dtype=np.float32)
    first = _ingest(client, rows, [1, 2, 3, 4, 5, 6], "typo-batch-7")
    assert not first["duplicate"]
    total = first["total_samples"]

    r = client.post("/samples/delete", headers=ADMIN, json={"ingest_key": "typo-batch-7"})
    assert r.status_code == 422 and "reason" in r.json()["error"]  # a delete needs a reason
    assert _count(client) == total
    r = client.post("/samples/delete", headers=ADMIN,
                    json={"ingest_key": "typo-batch-7", "reason": "labels shifted by one"})
    assert r.status_code == 200, r.text
    assert r.json()["affected"] == 6 and r.json()["action"] == "delete"
    assert _count(client) == total - 6
    assert _all_rows(client, ingest_key="typo-batch-7") == []

    retry = _ingest(client, rows, [1, 2, 3, 4, 5, 6], "typo-batch-7")  # the client's retry
    assert retry["duplicate"] and retry["total_samples"] == total - 6
    assert _all_rows(client, ingest_key="typo-batch-7") == []  # nothing came back

    # by ids, one of which was already gone: only the rows that existed are counted
    fresh = _ingest(client, rows[:2], [0, 0], "two-rows")
    ids = [s["id"] for s in _all_rows(client, ingest_key="two-rows")]
    r = client.post("/samples/delete", headers=ADMIN, json={"ids": [*ids, 10**12], "reason": "dup"})
    assert r.json()["affected"] == 2 and _count(client) == fresh["total_samples"] - 2
    # a selector that matches nothing: 200, affected 0, still audited
    r = client.post("/samples/delete", headers=ADMIN, json={"ingest_key": "never-used", "reason": "x"})
    assert r.status_code == 200 and r.json()["affected"] == 0
    assert _audit(client, limit=1)["entries"][0]["id"] == r.json()["audit_id"]


def test_audit_trail_is_newest_first_with_who_what_and_why(client: httpx.Client) -> None:
    rows = np.random.default_rng(4).random((3, D), dtype=np.float32)
    _ingest(client, rows, [7, 8, 9], "audited")
    ids = [s["id"] for s in _all_rows(client, ingest_key="audited")]
    batch_id = _all_rows(client, ingest_key="audited")[0]["batch_id"]
    made = []
    for path, body in (("/samples/quarantine", {"ids": ids[:2], "reason": "suspicious"}),
                       ("/samples/release", {"batch_id": batch_id, "actor": "bob"}),
                       ("/samples/delete", {"from_id": ids[2], "to_id": ids[2], "reason": "bad sensor"})):
        r = client.post(path, headers=ADMIN, json=body)
        assert r.status_code == 200, r.text
        made.append(r.json())

    page = _audit(client, limit=2)
    newest = page["entries"]
    assert [e["id"] for e in newest] == [made[2]["audit_id"], made[1]["audit_id"]]
    assert newest[0] == {**newest[0], "action": "delete", "actor": "api:127.0.0.1", "affected": 1,
                         "selector": {"from_id": ids[2], "to_id": ids[2]}, "reason": "bad sensor"}
    assert newest[1] == {**newest[1], "action": "release", "actor": "api:127.0.0.1 (bob)", "affected": 2,
                         "selector": {"batch_id": batch_id}, "reason": None}
    assert page["next_before_id"] == made[1]["audit_id"]
    older = _audit(client, limit=1, before_id=page["next_before_id"])["entries"][0]
    assert older["id"] == made[0]["audit_id"] and older["action"] == "quarantine"
    assert older["selector"] == {"ids": ids[:2]} and older["affected"] == 2 and older["at"]


ROUTES = [("GET", "/samples"), ("GET", "/samples/audit"), ("POST", "/samples/quarantine"),
          ("POST", "/samples/release"), ("POST", "/samples/delete")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_needs_the_admin_key(client: httpx.Client, method: str, path: str) -> None:
    before = len(_audit(client, limit=1000)["entries"])
    body = {"from_id": 1, "reason": "everything"}
    for headers in ({}, {"X-API-Key": "wrong"}):
        r = client.request(method, path, json=body if method == "POST" else None,
                           params={"limit": 5000} if method == "GET" else None, headers=headers)
        assert r.status_code == 401, r.text  # before any validation of the request
        assert "X-API-Key" in r.json()["error"]
    assert len(_audit(client, limit=1000)["entries"]) == before
    assert client.get("/samples/count").status_code == 200  # still public, not shadowed


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/samples/quarantine", {}, "no selector"),
    ("/samples/quarantine", {"reason": "why"}, "no selector"),
    ("/samples/quarantine", {"ids": [1], "batch_id": 1}, "several selectors (ids, batch_id)"),
    ("/samples/release", {"from_id": 1, "ingest_key": "k"}, "several selectors (from_id/to_id, ingest_key)"),
    ("/samples/quarantine", {"batch": 1}, "batch: Extra inputs are not permitted"),
    ("/samples/quarantine", {"ids": []}, "ids: List should have at least 1 item"),
    ("/samples/quarantine", {"ids": [1, "2"]}, "ids[1]: Input should be a valid integer"),
    ("/samples/quarantine", {"ids": [1.0]}, "ids[0]: Input should be a valid integer"),
    ("/samples/quarantine", {"batch_id": True}, "batch_id: Input should be a valid integer"),
    ("/samples/quarantine", {"from_id": 0}, "from_id: Input should be greater than or equal to 1"),
    ("/samples/quarantine", {"to_id": 2**63}, "to_id: Input should be less than or equal to"),
    ("/samples/quarantine", {"from_id": 9, "to_id": 3}, "from_id: 9 is greater than to_id 3"),
    ("/samples/quarantine", {"ingest_key": "a\u0000b"}, "ingest_key: String should match pattern"),
    ("/samples/quarantine", {"ids": list(range(1, 10_002))}, "ids: List should have at most 10000 items"),
    ("/samples/delete", {"from_id": 1}, "reason: Field required"),
    ("/samples/delete", {"from_id": 1, "reason": "   "}, "reason: Value error, a delete needs a reason"),
    ("/samples/delete", {"from_id": 1, "reason": None}, "reason: Input should be a valid string"),
    ("/samples/quarantine", {"from_id": 1, "reason": "a\u0000b"}, "reason: String should match pattern"),
])
def test_bad_bodies_are_422_naming_the_field_and_change_nothing(
        client: httpx.Client, server_store: Store, path: str, body: dict[str, Any], message: str) -> None:
    count, quarantined = _count(client), server_store.quarantined_count()
    audited = len(_audit(client, limit=1000)["entries"])
    r = client.post(path, headers=ADMIN, json=body)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]
    assert (_count(client), server_store.quarantined_count()) == (count, quarantined)
    assert len(_audit(client, limit=1000)["entries"]) == audited


def test_malformed_requests_are_4xx(client: httpx.Client) -> None:
    as_json = {**ADMIN, "Content-Type": "application/json"}
    r = client.post("/samples/delete", headers=as_json, content=b"{nope")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/samples/quarantine", headers=as_json, content=b"")
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = client.post("/samples/quarantine", headers={**ADMIN, "Content-Type": "text/plain"}, content=b"ids=1")
    assert r.status_code == 415
    for params, field in (({"limit": 1001}, "query.limit"), ({"limit": 0}, "query.limit"),
                          ({"quarantined": "maybe"}, "query.quarantined"),
                          ({"from_id": "x"}, "query.from_id"), ({"after_id": -1}, "query.after_id")):
        r = client.get("/samples", params=params, headers=ADMIN)
        assert r.status_code == 422 and field in r.json()["error"], (params, r.text)
    r = client.get("/samples/audit", params={"limit": 1001}, headers=ADMIN)
    assert r.status_code == 422 and "query.limit" in r.json()["error"]


def test_listing_pages_and_optional_features(client: httpx.Client) -> None:
    page = client.get("/samples", params={"limit": 3}, headers=ADMIN).json()
    assert len(page["samples"]) == 3 and page["next_after_id"] == page["samples"][-1]["id"]
    first = page["samples"][0]
    assert "features" not in first and first["n_features"] == D and isinstance(first["label"], int)
    assert first["targets"] is None and first["quarantined"] is False and first["created_at"]
    nxt = client.get("/samples", params={"limit": 2, "after_id": page["next_after_id"]}, headers=ADMIN).json()
    assert nxt["samples"][0]["id"] > page["samples"][-1]["id"]
    one = client.get("/samples", params={"from_id": first["id"], "to_id": first["id"], "features": "true"},
                     headers=ADMIN).json()
    assert len(one["samples"]) == 1 and one["next_after_id"] is None
    assert len(one["samples"][0]["features"]) == D
    assert all(0.0 <= v <= 1.0 for v in one["samples"][0]["features"])  # digits / 16
