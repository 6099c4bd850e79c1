"""Every piecewise-linear layer beyond ReLU imports exactly from ONNX (dynamo and legacy exporters)
and ``.pt2``, with a fixed and a dynamic batch, and exports back to ONNX: LeakyReLU, PReLU
(per-channel), ReLU6, Hardtanh, ceil_mode pools, rectangular / dilated kernels, Conv1d with
MaxPool1d / AvgPool1d / global pooling. Softmax heads are refused naming --strip-softmax, and
stripped on request (sklearn MLPs through skl2onnx included); smooth activations are refused
naming the layer the user wrote."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from app.core.network import DecoupledModel
from app.intake.networks import UnsupportedModel
from app.intake.networks.onnx_export import export_onnx
from app.intake.networks.onnx_import import import_onnx, logits_model, run_onnx
from app.intake.networks.torch_export_import import import_pt2, run_pt2
from tests.importers.pl_nets import PL_NETS, pl_trained
from tests.importers.test_onnx import close, export_torch

FORMATS = ["onnx-legacy", "onnx-dynamo", "pt2"]


@pytest.fixture(scope="module")
def nets() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    return {name: pl_trained(name) for name in PL_NETS}


def _save(net: nn.Module, shape: tuple[int, ...], tmp: Path, fmt: str, dynamic: bool) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pt2":
            dyn = ({0: torch.export.Dim("batch")},) if dynamic else None
            path = tmp / "m.pt2"
            torch.export.save(torch.export.export(net, (torch.randn(4, *shape),), dynamic_shapes=dyn), path)
            return path
        return export_torch(net, shape, tmp / "m.onnx", fmt == "onnx-dynamo", dynamic)


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(PL_NETS))
def test_import_exact_and_export_back(nets, tmp_path: Path, name: str, fmt: str, dynamic: bool) -> None:
    net, shape = nets[name]
    path = _save(net, shape, tmp_path, fmt, dynamic)
    imported = (import_pt2 if fmt == "pt2" else import_onnx)(path)
    assert imported.spec.input_shape == shape
    kinds = {layer["type"] for layer in imported.spec.layers}
    assert kinds & {"leaky_relu", "prelu", "hardtanh"}  # the layers came in as themselves
    model = DecoupledModel.from_net(imported.build()).eval()
    x = (np.random.default_rng(1).standard_normal((9, *shape)) * 2).astype(np.float32)
    ref = run_pt2(path, x) if fmt == "pt2" else run_onnx(path, x)
    with torch.no_grad():
        out = model(torch.from_numpy(x.reshape(9, -1))).numpy()
        torch_ref = net(torch.from_numpy(x)).numpy()
    assert close(ref, torch_ref)
    assert out.shape == ref.shape and close(out, ref), float(np.abs(out - ref).max())
    if dynamic and fmt != "onnx-legacy":  # export back (every net once per exporter family)
        back = tmp_path / "back.onnx"
        export_onnx(model, back)  # runs its own onnxruntime check as well
        assert close(run_onnx(back, x.reshape(9, -1).reshape(9, *shape)), out)


def _mlp(act: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), act, nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case, pattern", [
    (lambda: _mlp(nn.GELU()), r"(Erf|Gelu|gelu).*GELU.*piecewise-linear activation"),
    (lambda: _mlp(nn.SiLU()), r"(Sigmoid|silu).*SiLU"),
    (lambda: _mlp(nn.Tanh()), r"[Tt]anh.*Hardtanh"),
    (lambda: nn.Sequential(_mlp(nn.ReLU()), nn.Softmax(dim=1)), r"oftmax.*--strip-softmax"),
], ids=["gelu", "silu", "tanh", "softmax"])
def test_refusals_name_the_layer_and_what_to_do(tmp_path: Path, fmt: str, case, pattern: str) -> None:
    path = _save(case(), (6,), tmp_path, fmt, True)
    with pytest.raises(UnsupportedModel, match=pattern):
        (import_pt2 if fmt == "pt2" else import_onnx)(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("head", [nn.Softmax, nn.LogSoftmax])
def test_strip_softmax_serves_the_logits(tmp_path: Path, fmt: str, head) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.05), nn.Linear(8, 3), head(dim=1)).eval()
    path = _save(net, (6,), tmp_path, fmt, True)
    imported = (import_pt2 if fmt == "pt2" else import_onnx)(path, strip_softmax=True)
    assert imported.stripped_softmax == head.__name__
    model = DecoupledModel.from_net(imported.build()).eval()
    x = torch.randn(20, 6)
    with torch.no_grad():
        assert torch.allclose(model(x), net[:3](x), atol=1e-6)  # the logits
        assert torch.equal(model(x).argmax(1), net(x).argmax(1))  # same predictions


def test_sklearn_mlp_classifier_via_skl2onnx(tmp_path: Path) -> None:
    pytest.importorskip("skl2onnx")
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 5)).astype(np.float32)
    y = np.array(["cat", "dog", "eel"])[(x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier((16, 8), max_iter=200, random_state=0).fit(x, y)
    path = tmp_path / "clf.onnx"
    path.write_bytes(to_onnx(clf, x[:1]).SerializeToString())
    with pytest.raises(UnsupportedModel, match="--strip-softmax"):
        import_onnx(path)
    imported = import_onnx(path, strip_softmax=True)
    assert imported.class_names == ["cat", "dog", "eel"]
    assert any("Cast" in n for n in imported.notes)
    model = DecoupledModel.from_net(imported.build()).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    ref = run_onnx(logits_model(onnx.load(str(path)), _softmax(path)), x)
    assert close(logits, ref)
    assert [imported.class_names[i] for i in logits.argmax(1)] == list(clf.predict(x))


def _softmax(path: Path) -> onnx.NodeProto:
    return next(n for n in onnx.load(str(path)).graph.node if n.op_type == "Softmax")


@pytest.mark.parametrize("include", [0, 1])
def test_hand_written_onnx_asymmetric_pads_ceil_clip_prelu(tmp_path: Path, include: int) -> None:
    """What no torch exporter writes but ONNX files carry: asymmetric pads on Conv, MaxPool and
    AveragePool (with ceil_mode), Clip with constant bounds, PRelu slopes shaped [C, 1, 1],
    LeakyRelu, a float→float Cast; exact against onnxruntime."""
    from onnx import TensorProto, helper

    from tests.importers.test_onnx import _graph_model

    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 2, 3, 2)), "b": rng.standard_normal(4),
             "slope": rng.uniform(-0.3, 0.5, (4, 1, 1)), "lo": np.array(-0.5), "hi": np.array(1.5),
             "w2": rng.standard_normal((3, 4 * 4 * 3)), "shape0": np.array([0, -1])}
    nodes = [
        helper.make_node("Cast", ["x"], ["xc"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["xc", "w", "b"], ["c"], pads=[1, 0, 0, 2], strides=[1, 2]),
        helper.make_node("PRelu", ["c", "slope"], ["p"]),
        helper.make_node("MaxPool", ["p"], ["m"], kernel_shape=[2, 3], pads=[1, 1, 0, 0], strides=[2, 2],
                         ceil_mode=1),
        helper.make_node("Clip", ["m", "lo", "hi"], ["k"]),
        helper.make_node("AveragePool", ["k"], ["a"], kernel_shape=[2, 2], pads=[1, 0, 0, 1], strides=[2, 1],
                         ceil_mode=1, count_include_pad=include),
        helper.make_node("LeakyRelu", ["a"], ["l"], alpha=0.3),
        helper.make_node("Reshape", ["l", "shape0"], ["f"]),
        helper.make_node("Gemm", ["f", "w2"], ["y"], transB=1),
    ]
    path = tmp_path / "hand.onnx"
    onnx.save(_graph_model(nodes, inits, 17, ["n", 2, 11, 9]), path)
    imported = import_onnx(path)
    assert {layer["type"] for layer in imported.spec.layers} >= {"prelu", "hardtanh", "leaky_relu", "maxpool"}
    model = DecoupledModel.from_net(imported.build()).eval()
    x = (rng.standard_normal((5, 2 * 11 * 9)) * 2).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    assert close(out, run_onnx(path, x))
    back = tmp_path / "back.onnx"
    export_onnx(model, back)
    assert close(run_onnx(back, x.reshape(5, 2, 11, 9)), out)
    # where ONNX's ceil_mode rule and torch's disagree (a last window starting in the end padding)
    nodes[3] = helper.make_node("MaxPool", ["p"], ["m"], kernel_shape=[2, 3], pads=[0, 1, 1, 0],
                                strides=[2, 2], ceil_mode=1)
    inits["w2"] = rng.standard_normal((3, 4 * 4 * 3))
    onnx.save(_graph_model(nodes, inits, 17, ["n", 2, 11, 9]), path)
    with pytest.raises(UnsupportedModel, match="ceil_mode"):
        import_onnx(path)


def test_sklearn_mlp_regressor_via_skl2onnx(tmp_path: Path) -> None:
    """MLPRegressor: Cast / MatMul / Add / Relu / Reshape, no head to strip."""
    pytest.importorskip("skl2onnx")
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPRegressor

    x = np.random.default_rng(0).standard_normal((200, 5)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = MLPRegressor(hidden_layer_sizes=(16, 8), max_iter=200, random_state=0)
        reg.fit(x, 2 * x[:, 0] + x[:, 1])
    path = tmp_path / "reg.onnx"
    path.write_bytes(to_onnx(reg, x[:1]).SerializeToString())
    imported = import_onnx(path)
    model = DecoupledModel.from_net(imported.build()).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    assert close(out, run_onnx(path, x))
    assert close(out.ravel(), reg.predict(x).astype(np.float32))
