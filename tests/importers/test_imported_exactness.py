"""Exactness on imported, BatchNorm-folded architectures (CNN with pools, ResNet-style)."""

from pathlib import Path

import pytest
import torch

from app.core.data import Split
from app.core.network import DecoupledModel, Estimator, PathSelector
from app.core.training import TrainConfig, train_qk
from app.intake.networks.onnx_import import import_onnx
from tests.importers.nets import trained


@pytest.fixture(params=["cnn", "resnet"])
def imported(request: pytest.FixtureRequest, tmp_path: Path):
    net, shape = trained(request.param)
    path = tmp_path / f"{request.param}.onnx"
    torch.onnx.export(net, (torch.randn(2, *shape),), path, dynamo=False, do_constant_folding=False,
                      dynamic_axes={"input": {0: "batch"}}, input_names=["input"])
    result = import_onnx(path)
    assert any("BatchNormalization" in note for note in result.notes)  # folded, not skipped
    return result


def test_estimator_equals_plain_net_and_is_affine_for_fixed_gates(imported) -> None:
    net = imported.build()
    model = DecoupledModel.from_net(net)
    x = torch.randn(6, net.spec.input_dim)
    with torch.no_grad():
        assert (model(x) - net(x)).abs().max().item() <= 1e-5
    other = DecoupledModel(PathSelector(imported.build()), Estimator(imported.build())).double()
    with torch.no_grad():
        for p in other.estimator.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x1, x2 = torch.randn(4, net.spec.input_dim, dtype=torch.float64), torch.randn(4, net.spec.input_dim,
                                                                                  dtype=torch.float64)
    structure = other.selector.structure(x1)
    f = lambda v: other.estimator(v, structure)  # noqa: E731
    with torch.no_grad():
        for a in (0.3, -1.7):
            assert torch.allclose(f(a * x1 + (1 - a) * x2), a * f(x1) + (1 - a) * f(x2), atol=1e-9, rtol=1e-9)


def test_qk_training_leaves_the_imported_selector_untouched(imported) -> None:
    model = DecoupledModel.from_net(imported.build())
    before = [p.clone() for p in model.selector.parameters()]
    k = model.spec.num_outputs
    x = torch.randn(200, model.spec.input_dim)
    y = torch.randint(0, k, (200,))
    train_qk(model, Split(x[:160], y[:160]), Split(x[160:], y[160:]), TrainConfig(device="cpu", qk_epochs=1))
    assert all(torch.equal(a, b) for a, b in zip(before, model.selector.parameters(), strict=True))
