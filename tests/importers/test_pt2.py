"""``torch.export`` programs → selector + estimator: the three test nets reproduced exactly
(fixed and dynamic batch), constant adds folded, and non-ReLU ops refused with the op named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from app.core.network import DecoupledModel
from app.intake.networks import UnsupportedModel
from app.intake.networks.torch_export_import import import_pt2, run_pt2
from tests.importers.nets import NETS, trained


def _save(net: nn.Module, shape: tuple[int, ...], path: Path, dynamic: bool, batch: int = 4) -> Path:
    x = torch.randn(batch, *shape)
    dyn = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=dyn), path)
    return path


def _served(path: Path, x: np.ndarray) -> np.ndarray:
    model = DecoupledModel.from_net(import_pt2(path).build()).eval()
    with torch.no_grad():
        return model(torch.from_numpy(x.reshape(x.shape[0], -1))).numpy()


def _close(a: np.ndarray, ref: np.ndarray) -> bool:
    return a.shape == ref.shape and float(np.abs(a - ref).max()) <= 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic"])
@pytest.mark.parametrize("name", sorted(NETS))
def test_nets_served_exactly(tmp_path: Path, name: str, dynamic: bool) -> None:
    net, shape = trained(name)
    path = _save(net, shape, tmp_path / f"{name}.pt2", dynamic)
    imported = import_pt2(path)
    assert imported.source_format == "pt2" and imported.spec.input_shape == shape
    x = np.random.default_rng(1).standard_normal((37, *shape)).astype(np.float32)
    ref = run_pt2(path, x)
    with torch.no_grad():
        torch_ref = net(torch.from_numpy(x)).numpy()
    assert _close(ref, torch_ref)  # run_pt2 itself is the source model (chunked for a fixed batch)
    assert _close(_served(path, x), ref)
    assert any("BatchNorm" in note for note in imported.notes)  # every test net has one


@pytest.mark.parametrize("name", sorted(NETS))
def test_core_aten_programs(tmp_path: Path, name: str) -> None:
    """Lowered programs (convolution, permute + addmm, max_pool2d_with_indices, mean.dim, view,
    _native_batch_norm_legit_no_training) import the same way, without a further decomposition."""
    net, shape = trained(name)
    program = torch.export.export(net, (torch.randn(4, *shape),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},)).run_decompositions()
    path = tmp_path / f"{name}-core.pt2"
    torch.export.save(program, path)
    imported = import_pt2(path)
    assert not any("walked the program after" in note for note in imported.notes), imported.notes
    x = np.random.default_rng(4).standard_normal((11, *shape)).astype(np.float32)
    assert _close(_served(path, x), run_pt2(path, x))


def test_notes_and_layers_of_the_mlp(tmp_path: Path) -> None:
    net, shape = trained("mlp")
    imported = import_pt2(_save(net, shape, tmp_path / "mlp.pt2", dynamic=True))
    kinds = [layer["type"] for layer in imported.spec.layers]
    assert kinds == ["linear", "relu", "linear", "relu", "linear"]
    assert any("dropout" in note for note in imported.notes)


class _BiasAfter(nn.Module):
    """Linear without bias + a buffer added and a scale: both fold into the linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 7, bias=False), nn.Linear(7, 2)
        self.register_buffer("shift", torch.randn(7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu((self.a(x) + self.shift) * 0.5 - 1.0))


def test_constant_affine_folded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = _save(_BiasAfter().eval(), (5,), tmp_path / "bias.pt2", dynamic=True)
    imported = import_pt2(path)
    assert [layer["type"] for layer in imported.spec.layers] == ["linear", "relu", "linear"]
    x = np.random.default_rng(2).standard_normal((20, 5)).astype(np.float32)
    assert _close(_served(path, x), run_pt2(path, x))


class _Act(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(6, 8), act, nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


def _bn_after_relu() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2))


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.g, self.b = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x)) * self.g(x))


@pytest.mark.parametrize(("make", "op", "why"), [
    (lambda: _Act(nn.GELU()), "gelu", "not piecewise linear"),
    (lambda: _Act(nn.Sigmoid()), "sigmoid", "not piecewise linear"),
    (_bn_after_relu, "batch_norm", "relu output"),
    (lambda: nn.Sequential(nn.Linear(6, 3), nn.Softmax(dim=1)), "softmax", "export the logits"),
    (_Gated, "mul", "two activations"),
    (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU()), "relu", "must be linear"),
], ids=["gelu", "sigmoid", "bn-after-relu", "softmax", "mul", "relu-output"])
def test_refused_naming_the_op(tmp_path: Path, make, op: str, why: str) -> None:
    torch.manual_seed(0)
    path = _save(make().eval(), (6,), tmp_path / "m.pt2", dynamic=False, batch=3)
    with pytest.raises(UnsupportedModel) as info:
        import_pt2(path)
    message = str(info.value)
    assert op in message and why in message, message


def test_input_shape_override_must_match(tmp_path: Path) -> None:
    net, shape = trained("cnn")
    path = _save(net, shape, tmp_path / "cnn.pt2", dynamic=True)
    assert import_pt2(path, input_shape=(144,)).spec.input_shape == shape  # flat view of the same input
    with pytest.raises(UnsupportedModel, match="features"):
        import_pt2(path, input_shape=(1, 10, 10))
