"""`skqk init --data FILE` on CSV, Parquet and NPZ, as a user runs it (the real CLI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.serving.models import schema_of
from app.storage import Store
from tests.owndata.conftest import (
    INIT_FAST,
    breast_cancer_table,
    sample_count,
    skqk,
    write_csv,
    write_parquet,
)


def _active_record(data_dir: Path):
    store = Store(f"sqlite:///{data_dir / 'skqk.db'}")
    try:
        active = store.active_version()
        return active, store.get_version(active, weights=False) if active else None
    finally:
        store.dispose()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "npz"])
def test_init_from_file(fmt: str, data_dir: Path, tmp_path: Path) -> None:
    table = breast_cancer_table()
    names = [n for n in table.column_names if n != "diagnosis"]
    if fmt == "csv":
        path = write_csv(table, tmp_path / "cancer.csv")
    elif fmt == "parquet":
        path = write_parquet(table, tmp_path / "cancer.parquet")
    else:
        x = np.stack([table[n].to_numpy() for n in names], axis=1)
        y = (table["diagnosis"].to_numpy(zero_copy_only=False) == "benign").astype(np.int64)
        path = tmp_path / "cancer.npz"
        np.savez(path, x=x, y=y)
    run = skqk(data_dir, "init", "--data", str(path), "--label-column", "diagnosis", *INIT_FAST)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "holdout_acc=" in run.stdout

    active, record = _active_record(data_dir)
    assert active == 1
    schema = schema_of(record)
    assert schema.task == "classification" and schema.input_shape == (30,)
    if fmt == "npz":  # NPZ: columns by position, integer labels stay integers
        assert schema.feature_names[:2] == ("f0", "f1") and schema.class_names is None
    else:
        assert list(schema.feature_names) == names  # verbatim, in file order
        assert schema.class_names == ("benign", "malignant")
        assert schema.label_column == "diagnosis"
    assert schema.has_ranges
    assert "input_norm" in record.architecture  # mean/std learnt at init, part of the model
    assert record.metrics["holdout_acc"] > 0.85
    assert sample_count(data_dir) == 569


def test_init_features_option_picks_and_orders_columns(data_dir: Path, tmp_path: Path) -> None:
    path = write_csv(breast_cancer_table(), tmp_path / "cancer.csv")
    run = skqk(data_dir, "init", "--data", str(path), "--label-column", "diagnosis",
               "--features", "worst area,mean radius,mean texture", "--normalize", "none", *INIT_FAST)
    assert run.returncode == 0, run.stdout + run.stderr
    _, record = _active_record(data_dir)
    assert schema_of(record).feature_names == ("worst area", "mean radius", "mean texture")
    assert "input_norm" not in record.architecture


def test_init_file_too_small_names_the_setting(data_dir: Path, tmp_path: Path) -> None:
    path = write_csv(breast_cancer_table().slice(0, 80), tmp_path / "small.csv")
    run = skqk(data_dir, "init", "--data", str(path), "--label-column", "diagnosis", *INIT_FAST)
    assert run.returncode == 2
    assert "SKQK_MIN_HOLDOUT" in run.stdout, run.stdout
    assert _active_record(data_dir)[0] is None


def test_init_missing_label_column_is_named(data_dir: Path, tmp_path: Path) -> None:
    path = write_csv(breast_cancer_table(), tmp_path / "cancer.csv")
    run = skqk(data_dir, "init", "--data", str(path), "--label-column", "diagnosys", *INIT_FAST)
    assert run.returncode == 2
    assert "diagnosys" in run.stdout, run.stdout
    assert _active_record(data_dir)[0] is None


def test_serve_bootstraps_from_a_file(tmp_path: Path) -> None:
    from tests.helpers.server import ServerProcess, fast_env

    path = write_parquet(breast_cancer_table(), tmp_path / "cancer.parquet")
    data_dir = tmp_path / "served"
    env = fast_env(data_dir, SKQK_BOOTSTRAP_DATA=str(path), SKQK_BOOTSTRAP_LABEL_COLUMN="diagnosis",
                   SKQK_BOOTSTRAP_ARCH="mlp:32-32")
    with ServerProcess(data_dir, env) as server, server.client() as c:
        meta = c.get("/v2/models/skqk").json()
        assert meta["inputs"][0]["shape"] == [-1, 30]
        assert meta["parameters"]["class_names"] == ["benign", "malignant"]
        row = {name: float(v[0]) for name, v in breast_cancer_table().slice(0, 1).to_pydict().items()
               if name != "diagnosis"}
        body = c.post("/predict", json={"inputs": [row]}).json()
        assert body["predictions"][0] in ("benign", "malignant")
        assert c.get("/samples/count").json() == {"total": 569}
