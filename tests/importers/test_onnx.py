"""ONNX import (both torch exporters, fixed and dynamic batch) is exact against onnxruntime, the
served pair exports back to one ONNX graph, and non-ReLU models are refused naming the op."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from app.core.network import DecoupledModel
from app.intake.networks import ImportedNetwork, UnsupportedModel
from app.intake.networks.onnx_export import export_onnx
from app.intake.networks.onnx_import import import_onnx, run_onnx
from tests.importers.nets import NETS, trained


def close(got: np.ndarray, ref: np.ndarray) -> bool:
    return float(np.abs(got - ref).max()) <= 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def nets() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    return {name: trained(name) for name in NETS}


def export_torch(net: nn.Module, shape: tuple[int, ...], path: Path, dynamo: bool, dynamic: bool,
                 **kw) -> Path:
    x = torch.randn(2, *shape)
    if dynamo:
        ds = ({0: torch.export.Dim("batch")},) if dynamic else None
        torch.onnx.export(net, (x,), path, dynamo=True, dynamic_shapes=ds, **kw)
    else:
        axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None
        torch.onnx.export(net, (x,), path, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes=axes, **kw)
    return path


def served(imported: ImportedNetwork) -> DecoupledModel:
    return DecoupledModel.from_net(imported.build())


def model_out(model: DecoupledModel, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def check_import_and_export(path: Path, tmp_path: Path, input_shape: tuple[int, ...] | None = None
                            ) -> ImportedNetwork:
    imported = import_onnx(path, input_shape)
    model = served(imported)
    x = np.random.default_rng(1).standard_normal((7, imported.spec.input_dim)).astype(np.float32)
    ref = run_onnx(path, x)  # 7 rows: a fixed batch of 2 is run in padded chunks
    out = model_out(model, x)
    assert out.shape == ref.shape
    assert close(out, ref), float(np.abs(out - ref).max())
    back = tmp_path / "back.onnx"
    export_onnx(model, back, check=False)  # compared here rather than by its own check
    assert close(run_onnx(back, x), out)
    graph = onnx.load(str(back)).graph
    assert [i.name for i in graph.input] == ["input"] and graph.output[0].name == "logits"
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    return imported


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", list(NETS))
def test_import_matches_onnxruntime(nets, tmp_path: Path, name: str, dynamo: bool, dynamic: bool) -> None:
    net, shape = nets[name]
    path = export_torch(net, shape, tmp_path / f"{name}.onnx", dynamo, dynamic)
    imported = check_import_and_export(path, tmp_path)
    assert imported.spec.input_shape == shape and imported.source_format == "onnx"
    if name == "resnet":
        assert sum(layer["type"] == "add" for layer in imported.spec.layers) == 2
        assert imported.spec.layers[-2]["type"] in ("gap", "flatten")
    if name == "mlp" and not dynamo:  # the legacy exporter keeps BatchNorm1d as a node
        assert any("folded BatchNormalization" in n for n in imported.notes)


@pytest.mark.parametrize("name", list(NETS))
def test_unfolded_batchnorm_and_identity_nodes(nets, tmp_path: Path, name: str) -> None:
    """Without constant folding (opset 13) the legacy exporter keeps every BatchNormalization
    (after Conv and Gemm) and Identity nodes; all are folded or removed exactly."""
    net, shape = nets[name]
    path = export_torch(net, shape, tmp_path / f"{name}.onnx", False, True, do_constant_folding=False,
                        opset_version=13)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" in ops
    imported = check_import_and_export(path, tmp_path)
    assert len([n for n in imported.notes if "folded BatchNormalization" in n]) == {
        "mlp": 1, "cnn": 1, "resnet": 6}[name]


def test_unoptimised_dynamo_export(nets, tmp_path: Path) -> None:
    """torch.export's graph before onnxscript's optimiser: BatchNormalization nodes, constant
    shape arithmetic (Concat, Expand, CastLike) around the convolutions."""
    net, shape = nets["resnet"]
    path = export_torch(net, shape, tmp_path / "raw.onnx", True, False, optimize=False)
    imported = check_import_and_export(path, tmp_path)
    assert len([n for n in imported.notes if "folded BatchNormalization" in n]) == 6


# ---- hand-written graphs: MatMul + Add, ReduceMean (attribute and input axes), Reshape, Dropout --------
def _graph_model(nodes: list, inits: dict[str, np.ndarray], opset: int, in_shape: list, out: str = "y",
                 out_shape: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape or ["n", 3])],
        [numpy_helper.from_array(v.astype(np.int64 if k.startswith("shape") or k.startswith("axes")
                                              else np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _conv_gap_matmul(opset: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 2, 3, 3)), "b": rng.standard_normal(4),
             "m": rng.standard_normal((4, 3)), "c": rng.standard_normal(3), "shape": np.array([0, -1])}
    if opset >= 18:  # axes became an input
        inits["axes"] = np.array([2, 3])
        mean = helper.make_node("ReduceMean", ["r", "axes"], ["g"], keepdims=1)
    else:
        mean = helper.make_node("ReduceMean", ["r"], ["g"], axes=[-2, -1], keepdims=1)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["h"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["h"], ["r"]), mean,
             helper.make_node("Reshape", ["g", "shape"], ["f"]),
             helper.make_node("Dropout", ["f"], ["d"]),
             helper.make_node("MatMul", ["d", "m"], ["mm"]),
             helper.make_node("Add", ["c", "mm"], ["y"])]
    return _graph_model(nodes, inits, opset, ["n", 2, 6, 6])


@pytest.mark.parametrize("opset", [13, 18])
def test_matmul_add_reducemean_reshape(tmp_path: Path, opset: int) -> None:
    path = tmp_path / "hand.onnx"
    onnx.save(_conv_gap_matmul(opset), path)
    imported = check_import_and_export(path, tmp_path)
    assert [layer["type"] for layer in imported.spec.layers] == ["conv", "relu", "gap", "flatten", "linear"]
    assert any("folded Add" in n for n in imported.notes)
    assert any("removed Dropout" in n for n in imported.notes)


def test_input_shape_fills_symbolic_dims(tmp_path: Path) -> None:
    model = _conv_gap_matmul(13)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    path = tmp_path / "sym.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedModel, match="input_shape"):
        import_onnx(path)
    assert import_onnx(path, (2, 6, 6)).spec.input_shape == (2, 6, 6)


def test_old_opset_and_softmax_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((3, 4))}
    nodes = [helper.make_node("Gemm", ["x", "w"], ["z"], transB=1), helper.make_node("Softmax", ["z"], ["y"])]
    path = tmp_path / "soft.onnx"
    onnx.save(_graph_model(nodes, inits, 13, ["n", 4]), path)
    with pytest.raises(UnsupportedModel, match=r"Softmax node .*--strip-softmax"):
        import_onnx(path)
    onnx.save(_graph_model(nodes[:1], inits, 11, ["n", 4], out="z"), path)
    with pytest.raises(UnsupportedModel, match="opset 11"):
        import_onnx(path)


# ---- refusals from real exports ---------------------------------------------------------------------------
def _act_net(act: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), act, nn.Linear(8, 2)).eval()


class _BnAfterRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)
        self.bn.running_mean.normal_()  # non-trivial statistics so no exporter can drop it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.bn(torch.relu(self.a(x))))


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("case, pattern", [("gelu", "Gelu|Erf"), ("sigmoid", "Sigmoid"),
                                           ("bn_after_relu", "BatchNormalization.*cannot be folded")])
def test_refused(tmp_path: Path, case: str, pattern: str, dynamo: bool) -> None:
    net = {"gelu": lambda: _act_net(nn.GELU()), "sigmoid": lambda: _act_net(nn.Sigmoid()),
           "bn_after_relu": lambda: _BnAfterRelu().eval()}[case]()
    path = export_torch(net, (6,), tmp_path / f"{case}.onnx", dynamo, True)
    with pytest.raises(UnsupportedModel, match=pattern):
        import_onnx(path)
