"""`skqk import` end to end over real processes: an imported ResNet-style ONNX model served
exactly (≤ 1e-4 against onnxruntime), exported back to ONNX, retrained (QK) on new data and
promoted; a torch.export MLP; unsupported ops refused with nothing stored."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.helpers.server import API_KEY, ServerProcess, fast_env, wait_job
from tests.importers.nets import mlp_net, resnet_net, teacher_data, train_briefly
from tests.owndata.conftest import sample_count, skqk

ADMIN = {"X-API-Key": API_KEY}
CLASSES = ["ant", "bee", "cat", "dog", "eel"]


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max()) <= 1e-4 * max(1.0, float(np.abs(b).max()))


def test_import_onnx_resnet_serve_export_retrain(tmp_path: Path) -> None:
    from app.intake.networks.onnx_import import run_onnx

    x, y = teacher_data(700, seed=0)
    torch.manual_seed(0)
    net = train_briefly(resnet_net(), torch.from_numpy(x), torch.from_numpy(y), steps=120, lr=0.05)
    onnx_path = tmp_path / "resnet.onnx"
    torch.onnx.export(net, (torch.from_numpy(x[:2]),), onnx_path, dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    np.savez(tmp_path / "train.npz", x=x, y=y)
    data_dir = tmp_path / "data"
    run = skqk(data_dir, "import", str(onnx_path), "--data", str(tmp_path / "train.npz"),
               "--label-column", "y", "--classes", ",".join(CLASSES))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "version 1 (active)" in run.stdout
    assert sample_count(data_dir) == 700

    new_x, new_y = teacher_data(300, seed=1)
    probe = new_x[:3]
    reference = run_onnx(onnx_path, probe.reshape(3, -1))
    with ServerProcess(data_dir, fast_env(data_dir)) as server, server.client() as c:
        meta = c.get("/v2/models/skqk").json()
        assert meta["inputs"][0]["shape"] == [-1, 3, 16, 16]
        nested = c.post("/predict", json={"inputs": probe.tolist()}).json()  # rows nested as [C][H][W]
        flat = c.post("/predict", json={"inputs": probe.reshape(3, -1).tolist()}).json()
        assert nested["outputs"] == flat["outputs"]
        served = np.asarray(flat["outputs"], dtype=np.float32)
        assert close(served, reference)
        assert flat["predictions"] == [CLASSES[i] for i in reference.argmax(1)]

        back = tmp_path / "back.onnx"
        exported = skqk(data_dir, "export", "1", "--format", "onnx", "-o", str(back))
        assert exported.returncode == 0, exported.stdout + exported.stderr
        assert close(run_onnx(back, probe.reshape(3, -1)), served)

        samples = [{"features": row.reshape(-1).tolist(), "label": CLASSES[int(label)]}
                   for row, label in zip(new_x, new_y, strict=True)]
        r = c.post("/ingest", json={"samples": samples, "idempotency_key": "more-images"})
        assert r.status_code == 200, r.text
        r = c.post("/retrain", json={"mode": "qk"}, headers=ADMIN)
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["job_id"])
        assert job["status"] == "succeeded", job
        assert job["result"]["promoted"] is True, job["result"]
        deadline = time.monotonic() + 10
        while c.post("/predict", json={"inputs": probe.tolist()}).json()["model_version"] != 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_import_pt2_mlp_without_data(tmp_path: Path) -> None:
    from app.intake.networks.torch_export_import import run_pt2

    torch.manual_seed(0)
    net = train_briefly(mlp_net(), torch.randn(64, 12), torch.randint(0, 3, (64,)))
    program = torch.export.export(net, (torch.randn(4, 12),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "mlp.pt2"
    torch.export.save(program, path)
    data_dir = tmp_path / "data"
    run = skqk(data_dir, "import", str(path))
    assert run.returncode == 0, run.stdout + run.stderr
    probe = np.random.default_rng(3).standard_normal((5, 12)).astype(np.float32)
    with ServerProcess(data_dir, fast_env(data_dir)) as server, server.client() as c:
        body = c.post("/predict", json={"inputs": probe.tolist()}).json()
        assert close(np.asarray(body["outputs"], dtype=np.float32), run_pt2(path, probe))
        assert body["predictions"] == body["prediction_indices"]  # no --classes: integers stay integers
        r = c.post("/retrain", json={"mode": "qk", "force": True}, headers=ADMIN)  # no samples at all
        job = wait_job(c, r.json()["job_id"])
        assert job["status"] == "failed" and "not enough samples" in job["error"]


class _GeluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.gelu(self.a(x)))


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_unsupported_op_refused_nothing_stored(tmp_path: Path, fmt: str) -> None:
    net = _GeluNet().eval()
    x = torch.randn(3, 6)
    path = tmp_path / f"gelu.{fmt}"
    if fmt == "onnx":
        torch.onnx.export(net, (x,), path, dynamo=False)
    else:
        torch.export.save(torch.export.export(net, (x,)), path)
    np.savez(tmp_path / "d.npz", x=np.random.rand(50, 6).astype(np.float32), y=np.zeros(50, dtype=np.int64))
    data_dir = tmp_path / "data"
    run = skqk(data_dir, "import", str(path), "--data", str(tmp_path / "d.npz"), "--label-column", "y")
    assert run.returncode == 2
    message = " ".join(run.stdout.split()).lower()
    assert "gelu" in message or "erf" in message, message
    assert sample_count(data_dir) == 0


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_every_net_and_format_served_exactly_exported_and_retrained(tmp_path: Path, name: str,
                                                                   fmt: str) -> None:
    """Each test net × format over HTTP: /predict ≤ 1e-4 of the source, the exported ONNX of the
    served version equal to /predict, then ingest → QK retrain → promoted → served."""
    from app.intake.networks.onnx_import import run_onnx
    from app.intake.networks.torch_export_import import run_pt2
    from tests.importers.nets import trained

    net, shape = trained(name)
    gen = np.random.default_rng(5)
    x = gen.standard_normal((400, *shape)).astype(np.float32)
    with torch.no_grad():  # the source model's own answers: a consistent labelling to retrain on
        y = net(torch.from_numpy(x)).argmax(1).numpy()
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "onnx":
        torch.onnx.export(net, (torch.from_numpy(x[:2]),), path, dynamo=False, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}})
    else:
        torch.export.save(torch.export.export(net, (torch.from_numpy(x[:2]),),
                                              dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    np.savez(tmp_path / "data.npz", x=x[:300], y=y[:300])
    data_dir = tmp_path / "data"
    run = skqk(data_dir, "import", str(path), "--data", str(tmp_path / "data.npz"), "--label-column", "y")
    assert run.returncode == 0, run.stdout + run.stderr
    probe = x[300:305].reshape(5, -1)
    source = run_onnx(path, probe) if fmt == "onnx" else run_pt2(path, probe)
    with ServerProcess(data_dir, fast_env(data_dir)) as server, server.client() as c:
        served = np.asarray(c.post("/predict", json={"inputs": probe.tolist()}).json()["outputs"],
                            dtype=np.float32)
        assert close(served, source)
        back = tmp_path / "back.onnx"
        assert skqk(data_dir, "export", "1", "-o", str(back)).returncode == 0
        assert close(run_onnx(back, probe), served)
        samples = [{"features": row.reshape(-1).tolist(), "label": int(label)}
                   for row, label in zip(x[300:], y[300:], strict=True)]
        assert c.post("/ingest", json={"samples": samples}).status_code == 200
        job = wait_job(c, c.post("/retrain", json={"mode": "qk"}, headers=ADMIN).json()["job_id"])
        assert job["status"] == "succeeded" and job["result"]["promoted"] is True, job
        deadline = time.monotonic() + 10
        while c.post("/predict", json={"inputs": probe.tolist()}).json()["model_version"] != 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
