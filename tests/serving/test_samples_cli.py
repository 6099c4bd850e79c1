"""`skqk samples …` as a real subprocess on a real SQLite store: actions, confirmation, audit."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.cli.samples import cli_actor
from app.storage import Store, open_store
from tests.helpers.server import REPO, fast_env


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{data_dir / 'skqk.db'}")
    rng = np.random.default_rng(0)
    s.ingest(rng.random((5, 4), dtype=np.float32), [0, 1, 2, 0, 1])
    s.ingest(rng.random((3, 4), dtype=np.float32), [2, 2, 2], idempotency_key="bad-export")
    yield s
    s.dispose()


def skqk(data_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**fast_env(data_dir), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "app.cli", "samples", *args], cwd=REPO, env=env, text=True,
                          input=stdin, capture_output=True, timeout=120, check=False)


def test_quarantine_release_and_list_by_key_and_range(store: Store, data_dir: Path) -> None:
    ids = store.load_samples(4).ids.tolist()
    done = skqk(data_dir, "quarantine", "--ingest-key", "bad-export", "--reason", "wrong labels")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "quarantine: 3 samples" in done.stdout
    assert "retrains now use 5 samples, 3 quarantined" in done.stdout
    assert store.load_samples(4).ids.tolist() == ids[:5]

    listed = skqk(data_dir, "list", "--quarantined", "--json")
    page = json.loads(listed.stdout)
    assert [r["id"] for r in page["samples"]] == ids[5:] and page["next_after_id"] is None
    held = {(r["quarantine_reason"], r["ingest_key"]) for r in page["samples"]}
    assert held == {("wrong labels", "bad-export")}
    table = skqk(data_dir, "list", "--limit", "4")
    assert table.returncode == 0 and "bad-export" not in table.stdout  # the first 4 rows have no key
    assert f"next page: --after-id {ids[3]}" in table.stdout
    assert "Store: 5 samples used by retrains, 3 quarantined" in table.stdout

    back = skqk(data_dir, "release", "--from-id", str(ids[6]), "--to-id", str(ids[7]))
    assert back.returncode == 0 and "release: 2 samples" in back.stdout
    assert store.load_samples(4).ids.tolist() == [*ids[:5], ids[6], ids[7]]
    entries = json.loads(skqk(data_dir, "audit", "--json").stdout)["entries"]
    assert [(e["action"], e["affected"], e["selector"]) for e in entries] == [
        ("release", 2, {"from_id": ids[6], "to_id": ids[7]}), ("quarantine", 3, {"ingest_key": "bad-export"})]
    assert {e["actor"] for e in entries} == {cli_actor()} and cli_actor().startswith("cli:")


def test_delete_asks_first_unless_yes(store: Store, data_dir: Path) -> None:
    ids = store.load_samples(4).ids.tolist()
    no_reason = skqk(data_dir, "delete", "--ids", f"{ids[0]},{ids[1]}", "--yes")
    assert no_reason.returncode == 2 and "--reason" in no_reason.stdout + no_reason.stderr
    declined = skqk(data_dir, "delete", "--ids", f"{ids[0]},{ids[1]}", "--reason", "dup", stdin="n\n")
    assert declined.returncode == 1 and "delete 2 samples" in declined.stderr
    assert store.sample_count() == 8 and store.sample_audit().entries == []

    confirmed = skqk(data_dir, "delete", "--ids", f"{ids[0]},{ids[1]}", "--reason", "dup", stdin="y\n")
    assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
    assert "delete: 2 samples" in confirmed.stdout and store.sample_count() == 6
    forced = skqk(data_dir, "delete", "--ingest-key", "bad-export", "--reason", "bad export", "--yes")
    assert forced.returncode == 0 and store.sample_count() == 3
    assert store.get_ingest_batch("bad-export") is not None  # the key stays taken
    audit = skqk(data_dir, "audit")
    assert audit.returncode == 0 and "bad export" in audit.stdout and "delete" in audit.stdout


@pytest.mark.parametrize(("args", "message"), [
    ((), "no selector: give exactly one of --ids, --from-id/--to-id, --ingest-key, --batch-id"),
    (("--ids", "1", "--batch-id", "1"), "several selectors (--ids, --batch-id)"),
    (("--from-id", "5", "--to-id", "2"), "--from-id: 5 is greater than --to-id 2"),
    (("--ids", "1,x"), "--ids: expected comma-separated integers"),
    (("--ids", "0"), "--ids[0]: must be an integer from 1"),
])
def test_bad_selectors_exit_2_and_change_nothing(store: Store, data_dir: Path, args: tuple[str, ...],
                                                 message: str) -> None:
    r = skqk(data_dir, "quarantine", *args)
    assert r.returncode == 2 and message in r.stdout, r.stdout + r.stderr
    assert store.quarantined_count() == 0 and store.sample_audit().entries == []
