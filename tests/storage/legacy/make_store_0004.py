"""Make ``store_0004.db``: a SQLite store written by the code of main before column types
(revision 0004_sample_counts, commit b77db1e), for the 0005 (``samples.raw``) migration test.

Made with that release's code, never the code under test::

    git worktree add /tmp/main0004 b77db1e
    PYTHONPATH=/tmp/main0004 python tests/storage/legacy/make_store_0004.py
    git worktree remove /tmp/main0004

Contents: 300 digits rows (64 features in [0, 1], labels 0..9) in two batches, version 1 of an
untrained ``mlp:64-16-10`` with a schema, active.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from app.core.features import FeatureSchema
from app.core.network import DecoupledModel, ReLUNet
from app.core.spec import mlp
from app.serving.models import register_model
from app.storage import open_store
from app.storage.schema import samples

OUT = Path(__file__).resolve().parent / "store_0004.db"


def main() -> None:
    if "raw" in samples.c:
        sys.exit("this is the new schema: put the code at revision 0004 first on PYTHONPATH")
    for path in (OUT, *(OUT.with_name(OUT.name + s) for s in ("-wal", "-shm"))):
        path.unlink(missing_ok=True)
    store = open_store(f"sqlite:///{OUT}")
    digits = load_digits()
    x = (digits.data[:300] / 16.0).astype(np.float32)
    y = digits.target[:300].astype(np.int64)
    store.ingest(x[:200], y[:200])
    store.ingest(x[200:], y[200:], idempotency_key="store-0004-batch-2")
    spec = mlp([64, 16, 10])
    v1 = register_model(store, DecoupledModel.from_net(ReLUNet(spec, seed=0)), "full", None,
                        {"holdout_acc": 0.1}, data_watermark=300, schema=FeatureSchema.default((64,), 10))
    store.activate(v1, actor="bootstrap", reason="first version")
    with store.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    store.dispose()
    for suffix in ("-wal", "-shm"):
        OUT.with_name(OUT.name + suffix).unlink(missing_ok=True)
    print(f"{OUT.name}: {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
