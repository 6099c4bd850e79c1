"""Plain-ReLU versions stored before structure became the piece index (issue 18) load and serve
unchanged: the same outputs bit for bit in process, the same packed structure bytes, and the
same /predict answers over HTTP. The fixture was written by the previous main (see
legacy/make_pl_legacy_store.py), never by the code under test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from app.serving.models import load_model
from app.storage import Store
from tests.helpers.server import ServerProcess, fast_env

LEGACY = Path(__file__).parent / "legacy"


def _copy(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(LEGACY / "store_eb46894_relu.db", data_dir / "skqk.db")
    return data_dir


def test_relu_versions_load_with_identical_outputs_and_structure(tmp_path: Path) -> None:
    record = json.loads((LEGACY / "store_eb46894_relu.json").read_text())
    store = Store(f"sqlite:///{_copy(tmp_path) / 'skqk.db'}")
    try:
        probe = torch.tensor(record["probe"], dtype=torch.float32)
        for version, want in record["versions"].items():
            model, _ = load_model(store, int(version))
            assert model.selector.layout.single_bit  # plain ReLU: one bit per unit, as before
            with torch.no_grad():
                # equal up to float32 summation order (torch's thread count, which an earlier test in
                # the same process may have changed, reorders the sums); the gates below are bitwise
                torch.testing.assert_close(model(probe), torch.tensor(want["outputs"], dtype=torch.float32),
                                           rtol=1e-6, atol=1e-6)
            packed = model.selector.packed_structure(probe)
            assert packed.segments is None
            assert packed.gate_bits.numpy().tobytes().hex() == want["gate_bits"]
            assert [p.numpy().tobytes().hex() for p in packed.pool_choices] == want["pool_choices"]
    finally:
        store.dispose()


def test_relu_legacy_store_serves_the_same_predictions(tmp_path: Path) -> None:
    record = json.loads((LEGACY / "store_eb46894_relu.json").read_text())
    data_dir = _copy(tmp_path)
    want = np.asarray(record["versions"]["1"]["outputs"], dtype=np.float32)
    with ServerProcess(data_dir, fast_env(data_dir)) as server, server.client() as c:
        body = c.post("/predict", json={"inputs": record["probe"]}).json()
        assert body["model_version"] == 1
        got = np.asarray(body["outputs"], dtype=np.float32)
        assert np.abs(got - want).max() <= 1e-6 * max(1.0, float(np.abs(want).max()))
        assert body["predictions"] == want.argmax(1).tolist()
