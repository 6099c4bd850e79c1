"""Residual (DAG) specs and the wider op set: exactness, structure packing, QK training."""

import pytest
import torch

from app.core.data import Split
from app.core.network import DecoupledModel, Estimator, PathSelector, ReLUNet
from app.core.spec import ArchSpec, StructureLayout
from app.core.structure import pack, unpack
from app.core.training import TrainConfig, evaluate, train_qk


def resnet_spec(with_norm: bool = False) -> ArchSpec:
    """Two residual blocks (the second strided, with a 1×1 strided shortcut and a grouped conv),
    padded max-pool, average pool, global average pool."""
    layers = [
        {"type": "conv", "out": 8, "kernel": 3, "padding": 1},                       # 0
        {"type": "relu"},                                                            # 1
        {"type": "conv", "out": 8, "kernel": 3, "padding": 1},                       # 2
        {"type": "relu"},                                                            # 3
        {"type": "conv", "out": 8, "kernel": 3, "padding": 1},                       # 4
        {"type": "add", "inputs": [4, 1]},                                           # 5
        {"type": "relu"},                                                            # 6
        {"type": "conv", "out": 16, "kernel": 3, "stride": 2, "padding": 1},         # 7
        {"type": "relu"},                                                            # 8
        {"type": "conv", "out": 16, "kernel": 3, "padding": 1, "groups": 2},         # 9
        {"type": "conv", "out": 16, "kernel": 1, "stride": 2, "inputs": [6]},        # 10
        {"type": "add", "inputs": [9, 10]},                                          # 11
        {"type": "relu"},                                                            # 12
        {"type": "maxpool", "kernel": 3, "stride": 2, "padding": 1},                 # 13
        {"type": "avgpool", "kernel": 2, "stride": 1, "count_include_pad": False},   # 14
        {"type": "gap"},                                                             # 15
        {"type": "flatten"},                                                         # 16
        {"type": "linear", "out": 5},                                                # 17
    ]
    spec = ArchSpec(input_shape=(3, 16, 16), layers=tuple(layers), name="resnet-test")
    if with_norm:
        spec = spec.with_affines(([0.5] * spec.input_dim, [2.0] * spec.input_dim))
    return spec


def test_dag_spec_roundtrip_and_shapes():
    spec = resnet_spec()
    assert not spec.is_sequential
    assert ArchSpec.from_dict(spec.to_dict()) == spec
    shapes = spec.shapes()
    assert shapes[11] == (16, 8, 8) and shapes[13] == (16, 4, 4) and shapes[15] == (16, 1, 1)
    bad = dict(spec.to_dict())
    bad["layers"] = [*bad["layers"][:5], {"type": "add", "inputs": [4, 7]}, *bad["layers"][6:]]
    with pytest.raises(ValueError, match="bad inputs"):
        ArchSpec.from_dict(bad)


@pytest.mark.parametrize("with_norm", [False, True])
def test_estimator_equals_plain_resnet(with_norm):
    spec = resnet_spec(with_norm)
    net = ReLUNet(spec, seed=1)
    model = DecoupledModel.from_net(net)
    x = torch.randn(9, spec.input_dim)
    with torch.no_grad():
        assert (model(x) - net(x)).abs().max().item() <= 1e-5
    other = DecoupledModel(PathSelector(ReLUNet(spec, seed=1)), Estimator(ReLUNet(spec, seed=2)))
    with torch.no_grad():
        assert (other(x) - net(x)).abs().max().item() > 1e-3  # the estimator's weights matter


def test_resnet_is_affine_in_input_for_fixed_structure():
    spec = resnet_spec(True)
    model = DecoupledModel(PathSelector(ReLUNet(spec, seed=3)), Estimator(ReLUNet(spec, seed=4))).double()
    x1 = torch.randn(4, spec.input_dim, dtype=torch.float64)
    x2 = torch.randn(4, spec.input_dim, dtype=torch.float64) * 2
    structure = model.selector.structure(x1)
    f = lambda x: model.estimator(x, structure)  # noqa: E731
    with torch.no_grad():
        for a in (0.3, -1.7, 2.5):
            assert torch.allclose(f(a * x1 + (1 - a) * x2), a * f(x1) + (1 - a) * f(x2), atol=1e-9, rtol=1e-9)
        plain = model.selector.net
        assert not torch.allclose(plain(0.3 * x1 + 0.7 * x2), 0.3 * plain(x1) + 0.7 * plain(x2), atol=1e-6)


def test_padded_pool_structure_packs_losslessly():
    spec = resnet_spec()
    sel = PathSelector(ReLUNet(spec, seed=5))
    structure = sel.structure(torch.randn(7, spec.input_dim))
    layout = StructureLayout.of(spec)
    assert layout.pool_windows == [(3, 2, 1)]
    back = unpack(pack(structure, layout), layout)
    assert all(torch.equal(a, b) for a, b in zip(structure.gates, back.gates, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(structure.pool_indices, back.pool_indices, strict=True))


@pytest.mark.parametrize("qk_epochs", [0, 2])
def test_qk_training_on_resnet_leaves_selector_untouched(qk_epochs):
    spec = resnet_spec(True)
    net = ReLUNet(spec, seed=0)
    model = DecoupledModel.from_net(net)
    before = [p.clone() for p in model.selector.parameters()]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, spec.input_dim, generator=gen)
    y = (x[:, :50].sum(1) > 0).long() + 2 * (x[:, 50:100].sum(1) > 0).long()
    train, val = Split(x[:240], y[:240]), Split(x[240:], y[240:])
    loss_before = evaluate(lambda xb, _r: model(xb), val)[0]
    result = train_qk(model, train, val, TrainConfig(qk_epochs=qk_epochs, device="cpu", qk_lr=1e-3))
    loss_after = evaluate(lambda xb, _r: model(xb), val)[0]
    assert result.best_epoch >= 1 and loss_after < loss_before  # the refit learnt something
    assert abs(loss_after - result.best_val_loss) < 1e-4  # the served estimator is the best one
    assert all(torch.equal(a, b) for a, b in zip(before, model.selector.parameters(), strict=True))


def test_serving_uses_one_pass_exactly_when_the_trunks_agree():
    from app.serving.holder import SharedTrunkForward, compile_for_inference

    spec = resnet_spec(True)
    model = DecoupledModel.from_net(ReLUNet(spec, seed=7)).eval()
    with torch.no_grad():  # a readout-only QK retrain changes just the last layer
        model.estimator.net.blocks[-1].weight.mul_(1.5)
    runner = compile_for_inference(model, torch.device("cpu"))
    assert isinstance(runner, SharedTrunkForward)
    x = torch.randn(11, spec.input_dim)
    with torch.no_grad():
        assert torch.allclose(runner(x), model(x), rtol=1e-5, atol=1e-6)
        model.estimator.net.blocks[0].weight.add_(0.01)  # hidden layers differ: two passes needed
    assert compile_for_inference(model, torch.device("cpu")) is model
