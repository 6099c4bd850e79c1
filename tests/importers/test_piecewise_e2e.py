"""One end-to-end run per new family over real processes (`skqk import --data`, /predict within
1e-4 of the source, ingest, QK retrain promoted, `skqk export` equal to /predict): a LeakyReLU +
PReLU MLP (ONNX dynamo), a ReLU6 / Hardtanh / ceil_mode CNN (.pt2), a 1-D CNN (ONNX legacy), and
an sklearn MLPClassifier through skl2onnx with --strip-softmax (class labels from the file)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.server import API_KEY, ServerProcess, fast_env, wait_job
from tests.importers.pl_nets import pl_trained
from tests.owndata.conftest import sample_count, skqk

ADMIN = {"X-API-Key": API_KEY}


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and float(np.abs(a - b).max()) <= 1e-4 * max(1.0, float(np.abs(b).max()))


def _export(net: torch.nn.Module, x: np.ndarray, path: Path, fmt: str) -> None:
    sample = torch.from_numpy(x[:2])
    batch = ({0: torch.export.Dim("b")},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pt2":
            torch.export.save(torch.export.export(net, (sample,), dynamic_shapes=batch), path)
        elif fmt == "onnx-dynamo":
            torch.onnx.export(net, (sample,), path, dynamo=True, dynamic_shapes=batch)
        else:
            torch.onnx.export(net, (sample,), path, dynamo=False, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}})


def _serve_retrain_export(tmp_path: Path, data_dir: Path, probe: np.ndarray, source: np.ndarray,
                          rest_x: np.ndarray, rest_y: list, classes: list | None = None) -> None:
    from app.intake.networks.onnx_import import run_onnx

    with ServerProcess(data_dir, fast_env(data_dir)) as server, server.client() as c:
        body = c.post("/predict", json={"inputs": probe.tolist()}).json()
        served = np.asarray(body["outputs"], dtype=np.float32)
        assert close(served, source), float(np.abs(served - source).max())
        if classes is not None:
            assert body["predictions"] == [classes[i] for i in source.argmax(1)]
        back = tmp_path / "back.onnx"
        run = skqk(data_dir, "export", "1", "--format", "onnx", "-o", str(back))
        assert run.returncode == 0, run.stdout + run.stderr
        assert close(run_onnx(back, probe), served)
        samples = [{"features": row.reshape(-1).tolist(), "label": label}
                   for row, label in zip(rest_x, rest_y, strict=True)]
        assert c.post("/ingest", json={"samples": samples}).status_code == 200
        job = wait_job(c, c.post("/retrain", json={"mode": "qk"}, headers=ADMIN).json()["job_id"])
        assert job["status"] == "succeeded" and job["result"]["promoted"] is True, job
        deadline = time.monotonic() + 10
        while c.post("/predict", json={"inputs": probe.tolist()}).json()["model_version"] != 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        models = c.get("/models").json()
        return models


@pytest.mark.parametrize("name, fmt", [("leaky_prelu_mlp", "onnx-dynamo"), ("relu6_cnn", "pt2"),
                                       ("conv1d", "onnx-legacy")])
def test_family_imported_served_retrained_exported(tmp_path: Path, name: str, fmt: str) -> None:
    from app.intake.networks.onnx_import import run_onnx
    from app.intake.networks.torch_export_import import run_pt2

    net, shape = pl_trained(name)
    x = (np.random.default_rng(5).standard_normal((400, *shape)) * 2).astype(np.float32)
    with torch.no_grad():  # the source model's centred answers: a labelling it can learn, every class
        logits = net(torch.from_numpy(x))
        y = (logits - logits.mean(0)).argmax(1).numpy()
    path = tmp_path / f"{name}.{'pt2' if fmt == 'pt2' else 'onnx'}"
    _export(net, x, path, fmt)
    np.savez(tmp_path / "data.npz", x=x[:300].reshape(300, -1), y=y[:300])
    data_dir = tmp_path / "data"
    run = skqk(data_dir, "import", str(path), "--data", str(tmp_path / "data.npz"), "--label-column", "y")
    assert run.returncode == 0, run.stdout + run.stderr
    probe = x[300:305].reshape(5, -1)
    source = run_pt2(path, probe) if fmt == "pt2" else run_onnx(path, probe)
    _serve_retrain_export(tmp_path, data_dir, probe, source, x[300:], [int(v) for v in y[300:]])


def test_sklearn_mlp_classifier_strip_softmax(tmp_path: Path) -> None:
    pytest.importorskip("skl2onnx")
    import onnx
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    from app.intake.networks.onnx_import import logits_model, run_onnx

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6)).astype(np.float32)
    names = np.array(["low", "mid", "high"])
    y = names[(x[:, 0] > -0.3).astype(int) + (x[:, 1] + x[:, 2] > 0.4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier((16,), max_iter=300, random_state=0).fit(x[:350], y[:350])
    path = tmp_path / "clf.onnx"
    path.write_bytes(to_onnx(clf, x[:1]).SerializeToString())
    cols = {f"f{i}": x[:350, i] for i in range(6)}
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({**cols, "label": y[:350].tolist()}), tmp_path / "train.parquet")
    data_dir = tmp_path / "data"
    refused = skqk(data_dir, "import", str(path), "--data", str(tmp_path / "train.parquet"),
                   "--label-column", "label")
    assert refused.returncode == 2 and "--strip-softmax" in " ".join(refused.stdout.split())
    assert sample_count(data_dir) == 0
    run = skqk(data_dir, "import", str(path), "--data", str(tmp_path / "train.parquet"), "--label-column",
               "label", "--strip-softmax")
    assert run.returncode == 0, run.stdout + run.stderr
    model = onnx.load(str(path))
    head = next(n for n in model.graph.node if n.op_type == "Softmax")
    probe = x[350:356]
    source = run_onnx(logits_model(model, head), probe)
    classes = [str(c) for c in clf.classes_]
    assert [classes[i] for i in source.argmax(1)] == list(clf.predict(probe))
    models = _serve_retrain_export(tmp_path, data_dir, probe, source, x[350:], y[350:].tolist(), classes)
    first = next(m for m in models["versions"] if m["version"] == 1) if isinstance(models, dict) else \
        next(m for m in models if m["version"] == 1)
    assert first["metrics"]["stripped_softmax"] == "Softmax"
