"""Make ``store_eb46894_relu.db`` with the code of main before piecewise-linear structure (eb46894).

Issue 18 changed the structure from ReLU gates to piece indices; plain-ReLU versions stored
before must load and serve unchanged. How it was made (from /work/main)::

    git worktree add /tmp/legacy18 eb46894
    PYTHONPATH=/tmp/legacy18 python tests/storage/legacy/make_pl_legacy_store.py
    git worktree remove /tmp/legacy18

Contents: version 1 a seeded ``mlp:64-16-10``, version 2 a seeded LeNet-5 (8×8, ReLU + max-pool)
with a QK-retrained readout, both registered through the old code's ``register_model``; and
``store_eb46894_relu.json``: a probe batch, each version's outputs on it and the hex of its
packed structure, as the old code computed them.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import torch

from app.core.network import DecoupledModel, ReLUNet
from app.core.spec import lenet5, mlp
from app.serving.models import register_model
from app.storage import open_store

HERE = Path(__file__).resolve().parent
OUT = HERE / "store_eb46894_relu.db"


def main() -> None:
    OUT.unlink(missing_ok=True)
    store = open_store(f"sqlite:///{OUT}")
    probe = np.random.default_rng(0).random((6, 64)).astype(np.float32)
    record = {"probe": probe.tolist(), "versions": {}}
    nets = [mlp([64, 16, 10]), lenet5(8, 10)]
    for seed, spec in enumerate(nets):
        model = DecoupledModel.from_net(ReLUNet(spec, seed=seed))
        with torch.no_grad():  # a readout that differs from the selector's (as after a QK retrain)
            model.estimator.net.readout.weight.mul_(1.5)
        v = register_model(store, model, "full", None, {"source": "issue 18 legacy fixture"})
        x = torch.from_numpy(probe)
        with torch.no_grad():
            out = model(x)
        packed = model.selector.packed_structure(x)
        record["versions"][str(v)] = {
            "outputs": out.tolist(), "gate_bits": packed.gate_bits.numpy().tobytes().hex(),
            "pool_choices": [p.numpy().tobytes().hex() for p in packed.pool_choices]}
    store.activate(1, actor="fixture", reason="first")
    store.dispose()
    con = sqlite3.connect(OUT)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    (HERE / "store_eb46894_relu.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
