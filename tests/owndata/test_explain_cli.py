"""`skqk explain FILE -o OUT` on a store initialised from the breast cancer CSV (real subprocesses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.owndata.conftest import INIT_FAST, breast_cancer_table, skqk, write_csv, write_parquet


def test_explain_cli_writes_exact_contributions(tmp_path: Path, data_dir: Path) -> None:
    import pyarrow.parquet as pq

    from app.serving.models import load_model
    from app.storage import Store

    table = breast_cancer_table()
    csv = write_csv(table, tmp_path / "cancer.csv")
    run = skqk(data_dir, "init", "--data", str(csv), "--label-column", "diagnosis", *INIT_FAST)
    assert run.returncode == 0, run.stdout + run.stderr
    names = [c for c in table.column_names if c != "diagnosis"]

    out_csv = tmp_path / "from_csv.parquet"  # the label column in the file is simply not read
    run = skqk(data_dir, "explain", str(csv), "-o", str(out_csv), "--chunk-rows", "100")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "569 rows explained on version 1 (reference: training_mean)" in run.stdout
    got = pq.read_table(out_csv)
    assert got.schema.metadata[b"skqk.model_version"] == b"1"
    assert got.column_names[:5] == ["row", "prediction", "output", "value", "intercept"]
    assert got.column_names[5:35] == names and got.column_names[35:] == ["radius_l2", "radius_linf",
                                                                           "active_units"]
    assert got["row"].to_pylist() == list(range(1, 570))
    contrib = np.column_stack([got[n].to_numpy() for n in names])
    value, intercept = got["value"].to_numpy(), got["intercept"].to_numpy()
    scale = np.abs(intercept) + np.abs(contrib).sum(1)
    assert (np.abs(intercept + contrib.sum(1) - value) <= 1e-5 * scale).all()
    assert (got["radius_l2"].to_numpy() > 0).all()

    # the served model's own outputs and predictions
    store = Store(f"sqlite:///{data_dir / 'skqk.db'}")
    try:
        model, _ = load_model(store, 1)
    finally:
        store.dispose()
    x = np.column_stack([table[n].to_numpy() for n in names]).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    classes = np.asarray(["benign", "malignant"])
    assert got["prediction"].to_pylist() == classes[logits.argmax(1)].tolist()
    np.testing.assert_allclose(value, logits.max(1), rtol=1e-5, atol=1e-5)

    # Parquet in, other chunking, one chosen class: the same numbers for that class's rows
    pq_in = write_parquet(table, tmp_path / "cancer.parquet")
    out2 = tmp_path / "malignant.csv"
    run = skqk(data_dir, "explain", str(pq_in), "-o", str(out2), "--output", "malignant",
               "--reference", "zero")
    assert run.returncode == 0, run.stdout + run.stderr
    import pyarrow.csv as pacsv

    zero = pacsv.read_csv(out2)
    assert set(zero["output"].to_pylist()) == {"malignant"}
    np.testing.assert_allclose(zero["value"].to_numpy(), logits[:, 1], rtol=1e-5, atol=1e-5)

    bad = skqk(data_dir, "explain", str(csv), "-o", str(tmp_path / "x.parquet"), "--version", "7")
    assert bad.returncode == 2 and "version 7 not found" in bad.stdout
    bad = skqk(data_dir, "explain", str(csv), "-o", str(tmp_path / "x.parquet"), "--output", "cat")
    assert bad.returncode == 2 and "cat" in bad.stdout
    write_csv(table.drop(["mean radius"]), tmp_path / "short.csv")
    bad = skqk(data_dir, "explain", str(tmp_path / "short.csv"), "-o", str(tmp_path / "x.parquet"))
    assert bad.returncode == 1 and "mean radius" in bad.stdout
