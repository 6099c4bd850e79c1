"""A table as users have it (text categories, booleans, missing numbers and categories) end to
end on real processes: ``skqk init`` from CSV → serve → /predict raw rows (by name, nulls,
omitted features, an unknown category) → ``skqk ingest`` of a Parquet file and /ingest → QK
and full retrains → v2 with BYTES tensors equal to /predict; init from Parquet (bool type)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.helpers.server import API_KEY, ServerProcess, fast_env, wait_job
from tests.owndata.conftest import INIT_FAST, skqk

ADMIN = {"X-API-Key": API_KEY}
COLORS = ["red", "green", "blue"]


def mixed_table(n: int, seed: int, extra_color: str | None = None) -> pa.Table:
    """label = (size > 5) xor (color == 'red'), flipped by flag; ~10 % of size and shape missing."""
    rng = np.random.default_rng(seed)
    colors = list(rng.choice(COLORS + ([extra_color] if extra_color else []), n))
    size = rng.uniform(0, 10, n)
    flag = rng.random(n) < 0.5
    shape = list(rng.choice(["round", "square"], n))
    label = [("yes" if ((s > 5) != (c == "red")) != f else "no")
             for s, c, f in zip(size, colors, flag, strict=True)]
    size_col = [None if rng.random() < 0.1 else float(round(s, 3)) for s in size]
    shape_col = [None if rng.random() < 0.1 else s for s in shape]
    return pa.table({"color": colors, "size": size_col, "flag": flag.tolist(), "shape": shape_col,
                     "label": label})


def write_csv(table: pa.Table, path: Path) -> Path:
    # booleans as users' CSVs have them (True/False), missing values as empty cells and "NA"
    cols = {n: table.column(n).to_pylist() for n in table.column_names}
    cols["flag"] = ["True" if v else "False" for v in cols["flag"]]
    cols["shape"] = ["NA" if v is None else v for v in cols["shape"]]
    pacsv.write_csv(pa.table(cols), path)
    return path


def counter(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(name) and not line.startswith("#"))


@pytest.mark.timeout(900)  # two retrains, three CLI runs and two servers on a shared 2-core machine
def test_mixed_table_init_predict_ingest_retrain(data_dir: Path, tmp_path: Path) -> None:
    path = write_csv(mixed_table(1200, seed=0), tmp_path / "table.csv")
    run = skqk(data_dir, "init", "--data", str(path), "--label-column", "label", *INIT_FAST)
    assert run.returncode == 0, run.stdout + run.stderr

    env = fast_env(data_dir, SKQK_INPUT_RANGE="off")
    with ServerProcess(data_dir, env) as server, server.client() as c:
        schema = c.get("/models").json()[-1]["schema"]
        cols = {col["name"]: col for col in schema["columns"]}
        assert {k: v["type"] for k, v in cols.items()} == {
            "color": "categorical", "size": "numeric", "flag": "boolean", "shape": "categorical"}
        assert set(cols["color"]["categories"]) == set(COLORS) and cols["color"]["other"] is False
        assert cols["size"]["missing"] is True and cols["color"]["missing"] is False
        assert cols["shape"]["missing"] is True  # "NA" and empty cells were read as missing
        assert 4.0 < cols["size"]["impute"] < 6.0  # the median of uniform(0, 10)

        rows = [{"color": "red", "size": 8.0, "flag": False, "shape": "round"},
                {"color": "blue", "size": None, "flag": True, "shape": None},
                {"color": "green", "flag": "yes"},  # size and shape left out: missing
                ["red", 2.0, False, "square"]]  # a list in column order
        r = c.post("/predict", json={"inputs": rows})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["predictions"]) == 4 and set(body["predictions"]) <= {"yes", "no"}
        # a left-out optional feature is the same as null
        same = c.post("/predict", json={"inputs": [{"color": "green", "size": None, "flag": True,
                                                    "shape": None}]}).json()
        np.testing.assert_allclose(same["outputs"][0], body["outputs"][2], rtol=1e-5, atol=1e-6)

        bad = c.post("/predict", json={"inputs": [{"color": "red", "size": "big", "flag": True}]})
        assert bad.status_code == 422 and "inputs[0].size" in bad.text and "'big'" in bad.text
        bad = c.post("/predict", json={"inputs": [{"size": 1.0, "flag": True}]})  # color had no missing
        assert bad.status_code == 422 and "'color'" in bad.text
        bad = c.post("/predict", json={"inputs": [{"color": "red", "flag": "maybe"}]})
        assert bad.status_code == 422 and "inputs[0].flag" in bad.text

        # an unknown category: served as none of the known, and counted
        before = counter(c.get("/metrics").text, "skqk_unknown_categories_total")
        r = c.post("/predict", json={"inputs": [{"color": "purple", "size": 3.0, "flag": True}]})
        assert r.status_code == 200, r.text
        assert counter(c.get("/metrics").text, "skqk_unknown_categories_total") == before + 1

        # v2: one tensor per column, text as BYTES; equals /predict
        v2 = c.post("/v2/models/skqk/infer", json={"inputs": [
            {"name": "color", "shape": [2], "datatype": "BYTES", "data": ["red", "blue"]},
            {"name": "size", "shape": [2], "datatype": "FP32", "data": [8.0, None]},
            {"name": "flag", "shape": [2], "datatype": "BOOL", "data": [False, True]},
            {"name": "shape", "shape": [2], "datatype": "BYTES", "data": ["round", None]}]})
        assert v2.status_code == 200, v2.text
        out = {o["name"]: o for o in v2.json()["outputs"]}
        assert out["predictions"]["data"] == body["predictions"][:2]
        np.testing.assert_allclose(np.asarray(out["logits"]["data"]).reshape(2, -1),
                                   np.asarray(body["outputs"][:2]), rtol=1e-5, atol=1e-5)
        meta = c.get("/v2/models/skqk").json()
        assert [i["datatype"] for i in meta["inputs"]] == ["BYTES", "FP32", "BOOL", "BYTES"]

        # /explain with raw rows: contributions keyed by the table's columns (one-hot blocks and
        # missing indicators summed into their column), and output = intercept + Σ contributions
        ex = c.post("/explain", json={"inputs": rows[:3], "outputs": "all"})
        assert ex.status_code == 200, ex.text
        for i, row in enumerate(ex.json()["explanations"]):
            for k, item in enumerate(row["outputs"]):
                assert set(item["contributions"]) == {"color", "size", "flag", "shape"}
                total = item["intercept"] + sum(item["contributions"].values())
                assert item["value"] == pytest.approx(body["outputs"][i][k], rel=1e-5, abs=1e-5)
                assert total == pytest.approx(item["value"], rel=1e-4, abs=1e-4)

        # skqk ingest of a Parquet file (bool column, nulls, a category never seen: stored as it came)
        new = mixed_table(600, seed=1, extra_color="purple")
        pq.write_table(new, tmp_path / "new.parquet")
        run = skqk(data_dir, "ingest", str(tmp_path / "new.parquet"))
        assert run.returncode == 0, run.stdout + run.stderr
        assert "600 rows stored" in run.stdout
        # /ingest with raw rows
        samples = [{"features": {"color": "blue", "size": None, "flag": "no", "shape": "round"},
                    "label": "yes"},
                   {"features": {"color": "purple", "flag": True}, "label": "no"}]
        r = c.post("/ingest", json={"samples": samples})
        assert r.status_code == 200, r.text
        assert r.json()["total_samples"] == 1200 + 600 + 2

        for mode in ("qk", "full"):
            r = c.post("/retrain", json={"mode": mode, "force": True}, headers=ADMIN)
            assert r.status_code == 202, r.text
            job = wait_job(c, r.json()["job_id"], timeout=300)
            assert job["status"] == "succeeded", job
        versions = c.get("/models").json()
        assert len(versions) == 3
        assert all(v["schema"]["columns"] == schema["columns"] for v in versions)  # retrains keep it

        # skqk predict on a file gives /predict's answers for the same rows (unknown category too)
        probe = mixed_table(300, seed=3, extra_color="purple")
        probe = probe.drop_columns(["label"]).append_column("id", pa.array([f"r{i}" for i in range(300)]))
        write_csv(probe, tmp_path / "probe.csv")
        rows = [{k: v for k, v in r.items() if k != "id"} for r in probe.to_pylist()]
        served = c.post("/predict", json={"inputs": rows}).json()
        v = str(served["model_version"])
        for out_name in ("scores.parquet", "scores.csv"):
            run = skqk(data_dir, "predict", str(tmp_path / "probe.csv"), "-o", str(tmp_path / out_name),
                       "--version", v, "--keep", "id", "--outputs", "--chunk-rows", "64")
            assert run.returncode == 0, run.stdout + run.stderr
            assert "300 rows scored" in run.stderr and "unknown categories: color=" in run.stderr
        scored = pq.read_table(tmp_path / "scores.parquet")
        assert scored.column_names == ["id", "prediction", "prediction_index", "output_no", "output_yes"]
        assert scored.column("id").to_pylist() == [f"r{i}" for i in range(300)]
        assert scored.column("prediction").to_pylist() == served["predictions"]
        assert scored.column("prediction_index").to_pylist() == served["prediction_indices"]
        got = np.column_stack([scored.column("output_no").to_numpy(), scored.column("output_yes").to_numpy()])
        np.testing.assert_allclose(got, np.asarray(served["outputs"]), rtol=1e-5, atol=1e-5)
        as_csv = pacsv.read_csv(tmp_path / "scores.csv")
        assert as_csv.column("prediction").to_pylist() == served["predictions"]

        # ONNX: the graph takes the encoded vector; the encoding is written beside it
        run = skqk(data_dir, "export", v, "-o", str(tmp_path / "m.onnx"))
        assert run.returncode == 0, run.stdout + run.stderr
        doc = json.loads((tmp_path / "m.encoding.json").read_text())
        assert doc["graph_input"]["encoded"] is True and doc["columns"] == schema["columns"]
        import onnxruntime as ort

        from app.core.encoding import Encoding, parse_values

        enc = Encoding.from_list(doc["columns"])
        parsed = [parse_values([r.get(col.name) for r in rows], col.kind, col.name) for col in enc.columns]
        x, _ = enc.encode(parsed)
        sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
        (logits,) = sess.run(None, {"input": x})
        np.testing.assert_allclose(logits, np.asarray(served["outputs"]), rtol=1e-4, atol=1e-4)

    with sqlite3.connect(data_dir / "skqk.db") as db:
        raws = [json.loads(r) for (r,) in db.execute("SELECT raw FROM samples ORDER BY id")]
    assert len(raws) == 1802 and all(len(r) == 4 for r in raws)
    assert raws[-1] == ["purple", None, True, None] and raws[-2] == ["blue", None, False, "round"]
    assert sum(r[0] == "purple" for r in raws[1200:1800]) > 0  # unknown categories kept as they came

    with ServerProcess(data_dir, fast_env(data_dir, SKQK_UNKNOWN_CATEGORY="reject")) as server, \
            server.client() as c:
        r = c.post("/predict", json={"inputs": [{"color": "red", "flag": True},
                                                {"color": "purple", "size": 3.0, "flag": True}]})
        assert r.status_code == 422, r.text
        assert "inputs[1].color" in r.text and "'purple'" in r.text


def test_init_from_parquet_types_and_overrides(data_dir: Path, tmp_path: Path) -> None:
    table = mixed_table(800, seed=2).append_column("code", pa.array(np.arange(800) % 3))
    pq.write_table(table, tmp_path / "t.parquet")
    run = skqk(data_dir, "init", "--data", str(tmp_path / "t.parquet"), "--label-column", "label",
               "--categorical", "code", "--drop", "shape", *INIT_FAST)
    assert run.returncode == 0, run.stdout + run.stderr
    with sqlite3.connect(data_dir / "skqk.db") as db:
        (text,) = db.execute("SELECT feature_schema FROM model_versions").fetchone()
    cols = {c["name"]: c for c in json.loads(text)["columns"]}
    assert list(cols) == ["color", "size", "flag", "code"]
    assert cols["flag"]["type"] == "boolean" and cols["code"]["type"] == "categorical"
    assert cols["code"]["categories"] == ["0", "1", "2"]

    bad = pa.table({"color": ["red"] * 40, "size": ["1.5"] * 39 + ["huge"], "label": ["a", "b"] * 20})
    pq.write_table(bad, tmp_path / "bad.parquet")
    run = skqk(data_dir, "init", "--data", str(tmp_path / "bad.parquet"), "--label-column", "label",
               "--numeric", "size", "--force", *INIT_FAST)
    assert run.returncode == 2
    assert "row 40" in run.stdout and "'size'" in run.stdout and "'huge'" in run.stdout
