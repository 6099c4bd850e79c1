"""Sample administration in the store (SQLite and a real PostgreSQL): quarantine, release,
delete, listing and the audit trail, and what retrains then load."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select

from app.storage import IdempotencyConflict, SampleSelection, SelectionError, Store
from app.storage import sample_admin as sample_admin_mod
from app.storage.schema import ingest_batches, sample_audit, samples

ACTOR = "test:admin"


def _rows(n: int, seed: int, d: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 3, n)


def _three_batches(store: Store) -> tuple[list[int], list[int], list[int]]:
    """Batches of 5 (no key), 4 (key "poison") and 6 (key "later"); their sample ids."""
    store.ingest(*_rows(5, 0))
    store.ingest(*_rows(4, 1), idempotency_key="poison")
    store.ingest(*_rows(6, 2), idempotency_key="later")
    ids = store.load_samples(4).ids.tolist()
    return ids[:5], ids[5:9], ids[9:]


def _audit_rows(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(sample_audit)).scalar_one())


@pytest.mark.parametrize("selector", ["ids", "range", "ingest_key", "batch_id"])
def test_quarantine_by_each_selector_leaves_rows_out_of_retrains(store: Store, selector: str) -> None:
    first, poison, later = _three_batches(store)
    batch = store.ingest(*_rows(4, 1), idempotency_key="poison").batch_id  # duplicate: its batch id
    selection = {"ids": SampleSelection(ids=tuple(poison)),
                 "range": SampleSelection(from_id=poison[0], to_id=poison[-1]),
                 "ingest_key": SampleSelection(ingest_key="poison"),
                 "batch_id": SampleSelection(batch_id=batch)}[selector]

    done = store.quarantine_samples(selection, ACTOR, "label noise")
    assert done.affected == 4 and done.action == "quarantine"
    loaded = store.load_samples(4)
    assert loaded.ids.tolist() == first + later  # what every retrain (and its holdout) sees
    assert len(loaded.x) == len(loaded.y) == 11
    assert store.sample_count() == 11 and store.quarantined_count() == 4
    # a second quarantine changes nothing (and says so), still audited
    again = store.quarantine_samples(selection, ACTOR, "again")
    assert again.affected == 0 and again.audit_id > done.audit_id

    listed = store.list_samples(quarantined=True).rows
    assert [r.id for r in listed] == poison
    assert all(r.quarantine_audit_id == done.audit_id and r.quarantine_reason == "label noise"
               and r.ingest_key == "poison" for r in listed)

    released = store.release_samples(selection, ACTOR, "false alarm")
    assert released.affected == 4
    assert store.load_samples(4).ids.tolist() == first + poison + later
    assert store.sample_count() == 15 and store.quarantined_count() == 0
    assert [(a.action, a.affected, a.reason) for a in store.sample_audit().entries] == [
        ("release", 4, "false alarm"), ("quarantine", 0, "again"), ("quarantine", 4, "label noise")]
    assert store.sample_audit().entries[0].selector == selection.to_json()


def test_quarantine_applies_to_regression_loads_and_snapshots(store: Store) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    targets = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], np.float32)
    store.ingest(x, targets=targets, idempotency_key="reg")
    ids = store.load_samples(3, n_targets=2).ids.tolist()
    watermark = store.max_sample_id()
    store.quarantine_samples(SampleSelection(ids=(ids[1],)), ACTOR)
    snapshot = store.load_samples(3, max_id=watermark, n_targets=2)
    assert snapshot.ids.tolist() == [ids[0], ids[2], ids[3]]
    np.testing.assert_array_equal(snapshot.y, targets[[0, 2, 3]])
    row = store.list_samples(ingest_key="reg", features=True).rows[1]
    assert row.label is None and row.targets == [3.0, 4.0] and row.features == [3.0, 4.0, 5.0]
    assert row.quarantined and row.quarantine_reason is None


def test_delete_keeps_the_ingest_batch_so_a_retry_stays_a_no_op(store: Store) -> None:
    first, _poison, later = _three_batches(store)
    x, y = _rows(4, 1)
    done = store.delete_samples(SampleSelection(ingest_key="poison"), ACTOR, "sensor fault")
    assert done.affected == 4
    assert store.load_samples(4).ids.tolist() == first + later
    assert store.sample_count() == 11
    assert store.list_samples(ingest_key="poison").rows == []
    assert store.get_ingest_batch("poison") is not None  # the key stays taken

    retry = store.ingest(x, y, "poison")  # a client retrying the original request
    assert retry.duplicate and retry.accepted == 4 and retry.total_samples == 11
    assert store.sample_count() == 11  # the deleted rows did not come back
    with pytest.raises(IdempotencyConflict):
        store.ingest(x + 1, y, "poison")

    # ids are never reused, even after deleting the highest ones (the data watermark only grows)
    top = store.delete_samples(SampleSelection(from_id=later[0]), ACTOR, "drop the tail")
    assert top.affected == 6
    new_ids = store.load_samples(4).ids.tolist()
    store.ingest(*_rows(2, 9))
    assert store.load_samples(4).ids.tolist()[len(new_ids):][0] > later[-1]
    audit = store.sample_audit().entries
    assert [(a.action, a.selector, a.affected) for a in audit] == [
        ("delete", {"from_id": later[0]}, 6), ("delete", {"ingest_key": "poison"}, 4)]
    assert all(a.actor == ACTOR and a.at is not None for a in audit)


def test_delete_needs_a_reason_and_reasons_hold_no_nul(store: Store) -> None:
    store.ingest(*_rows(3, 0))
    with pytest.raises(ValueError, match="reason"):
        store.delete_samples(SampleSelection(from_id=1), ACTOR, "  ")
    with pytest.raises(ValueError, match="NUL"):  # PostgreSQL text cannot hold it: refused on both
        store.quarantine_samples(SampleSelection(from_id=1), ACTOR, "a\x00b")
    assert store.quarantined_count() == 0
    assert store.sample_count() == 3 and _audit_rows(store) == 0


def test_a_selector_matching_nothing_affects_nothing_and_is_audited(store: Store) -> None:
    store.ingest(*_rows(3, 0))
    for selection in (SampleSelection(ingest_key="never-used"), SampleSelection(batch_id=999),
                      SampleSelection(ids=(12345,)), SampleSelection(from_id=1000, to_id=2000)):
        assert store.delete_samples(selection, ACTOR, "cleanup").affected == 0
    assert store.sample_count() == 3
    assert [a.affected for a in store.sample_audit().entries] == [0, 0, 0, 0]


def test_action_and_audit_row_are_one_transaction(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.ingest(*_rows(5, 0), idempotency_key="k")

    def crash(*_a: object, **_k: object) -> None:  # after the rows changed, before the commit
        raise RuntimeError("crash before commit")

    monkeypatch.setattr(sample_admin_mod, "record_affected", crash)
    for action in (store.quarantine_samples, store.delete_samples):
        with pytest.raises(RuntimeError, match="crash before commit"):
            action(SampleSelection(ingest_key="k"), ACTOR, "x")
    monkeypatch.undo()
    assert store.sample_count() == 5 and store.quarantined_count() == 0
    assert _audit_rows(store) == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "no selector"),
    ({"ids": (1,), "batch_id": 2}, r"several selectors \(ids, batch_id\)"),
    ({"from_id": 1, "ingest_key": "k"}, r"several selectors \(from_id/to_id, ingest_key\)"),
    ({"ids": ()}, "ids: give at least one"),
    ({"ids": (1, 0)}, r"ids\[1\]: must be an integer"),
    ({"ids": tuple(range(1, 10_002))}, "ids: at most 10000"),
    ({"from_id": 5, "to_id": 2}, "from_id: 5 is greater than to_id 2"),
    ({"batch_id": 2**63}, "batch_id: must be an integer"),
    ({"ingest_key": "a\x00b"}, "ingest_key: must be 1 to 200 printable"),
    ({"ingest_key": ""}, "ingest_key"),
])
def test_bad_selections_are_refused_naming_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(SelectionError, match=message):
        SampleSelection(**kwargs)


def test_listing_pages_by_id_with_filters(store: Store) -> None:
    first, poison, later = _three_batches(store)
    seen: list[int] = []
    after = None
    pages = 0
    while True:
        page = store.list_samples(limit=4, after_id=after)
        seen += [r.id for r in page.rows]
        pages += 1
        if page.next_after_id is None:
            break
        assert page.next_after_id == page.rows[-1].id
        after = page.next_after_id
    assert seen == first + poison + later and pages == 4  # 15 rows: 4 + 4 + 4 + 3
    exact = store.list_samples(limit=15)
    assert len(exact.rows) == 15 and exact.next_after_id is None

    store.quarantine_samples(SampleSelection(ids=(poison[1], later[0])), ACTOR, "odd")
    assert [r.id for r in store.list_samples(quarantined=True).rows] == [poison[1], later[0]]
    assert len(store.list_samples(quarantined=False).rows) == 13
    assert [r.id for r in store.list_samples(from_id=poison[0], to_id=later[1],
                                             quarantined=False).rows] == [poison[0], *poison[2:], later[1]]
    batch = store.list_samples(ingest_key="later").rows
    assert [r.id for r in batch] == later and len({r.batch_id for r in batch}) == 1
    assert [r.id for r in store.list_samples(batch_id=batch[0].batch_id, limit=2).rows] == later[:2]
    row = store.list_samples(from_id=first[0], to_id=first[0], features=True).rows
    x, y = _rows(5, 0)
    assert row[0].features == x[0].tolist() and row[0].label == int(y[0]) and row[0].ingest_key is None
    assert store.list_samples(from_id=first[0], to_id=first[0]).rows[0].features is None
    with pytest.raises(SelectionError, match="limit"):
        store.list_samples(limit=1001)


def test_audit_is_newest_first_and_pages_back(store: Store) -> None:
    store.ingest(*_rows(3, 0))
    ids = store.load_samples(4).ids.tolist()
    made = [store.quarantine_samples(SampleSelection(ids=(i,)), f"actor{n}", f"r{n}").audit_id
            for n, i in enumerate(ids)]
    trail = store.sample_audit(limit=2)
    audit = trail.entries
    assert [a.id for a in audit] == made[::-1][:2] and trail.next_before_id == audit[-1].id
    older = store.sample_audit(before_id=trail.next_before_id)
    assert [a.id for a in older.entries] == made[:1] and older.next_before_id is None
    assert store.sample_audit(limit=3).next_before_id is None
    assert audit[0].actor == "actor2" and audit[0].reason == "r2" and audit[0].selector == {"ids": [ids[2]]}
    with store.engine.connect() as conn:  # the rows point at the audit entry that quarantined them
        rows = conn.execute(select(samples.c.id, samples.c.quarantine_audit_id).order_by(samples.c.id)).all()
        assert [tuple(r) for r in rows] == list(zip(ids, made, strict=True))
        assert conn.execute(select(func.count()).select_from(ingest_batches)).scalar_one() == 1
