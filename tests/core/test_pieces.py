"""Structure = the linear piece each unit is on: exactness for every piecewise-linear activation.

For every activation (ReLU, LeakyReLU, PReLU, ReLU6, Hardtanh) and every layer family (MLP,
1-D CNN, 2-D CNN with rectangular / asymmetric / ceil_mode windows):
- the estimator equals the plain network bit for bit at equal weights;
- the packed structure round-trips (2 bits per unit only for 3-piece layers);
- under a fixed structure the estimator is affine in its input (float64, second differences 0);
- a QK retrain (readout + gradient epochs) leaves the selector bit-identical.
"""

import copy
import dataclasses

import pytest
import torch

from app.core.data import Split, synthetic_arrays
from app.core.network import DecoupledModel, ReLUNet
from app.core.spec import ArchSpec, StructureLayout, activation_layer, resolve_arch
from app.core.structure import Structure, bytes_per_sample, gate_flip_fraction, pack, unpack
from app.core.training import TrainConfig, train_qk

ACTIVATIONS = ["relu", "leaky_relu:0.1", "prelu", "relu6", "hardtanh:-1,1"]


def _rect_cnn(act: str) -> ArchSpec:
    a = activation_layer(act)
    return ArchSpec((2, 9, 11), (
        {"type": "conv", "out": 4, "kernel": [3, 2], "stride": [1, 2], "padding": [1, 0, 0, 1],
         "dilation": [2, 1]}, a,
        {"type": "maxpool", "kernel": [2, 3], "stride": 2, "ceil_mode": True}, a,
        {"type": "conv", "out": 4, "kernel": 3, "padding": 1}, a,
        {"type": "maxpool", "kernel": 2, "padding": [0, 1, 1, 0]},
        {"type": "avgpool", "kernel": [2, 1], "ceil_mode": True, "count_include_pad": False,
         "padding": [1, 0, 0, 0]},
        {"type": "flatten"}, {"type": "linear", "out": 3}))


def _specs(act: str) -> list[ArchSpec]:
    return [resolve_arch("mlp:16-16", 10, 3, act), resolve_arch("cnn1d:4-4", 26, 3, act, (2, 13)),
            _rect_cnn(act)]


def _net(spec: ArchSpec, seed: int = 0) -> ReLUNet:
    net = ReLUNet(spec, seed=seed)
    with torch.no_grad():  # PReLU: per-unit slopes that differ (and some negative)
        for block in net.blocks:
            if isinstance(block, torch.nn.PReLU):
                block.weight.copy_(torch.linspace(-0.5, 0.7, block.weight.numel()))
    return net.eval()


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_estimator_equals_plain_net_and_structure_roundtrips(act):
    for spec in _specs(act):
        net = _net(spec)
        model = DecoupledModel.from_net(net)
        x = torch.randn(40, spec.input_dim, generator=torch.Generator().manual_seed(1)) * 3
        with torch.no_grad():
            assert torch.equal(model(x), net(x)), spec.name
        s = model.selector.structure(x)
        layout = StructureLayout.of(spec)
        packed = pack(s, layout)
        back = unpack(packed, layout)
        for g, h in zip(s.gates, back.gates, strict=True):
            assert torch.equal(g.to(torch.uint8), h.to(torch.uint8))
        for p, q in zip(s.pool_indices, back.pool_indices, strict=True):
            assert torch.equal(p, q)
        three = act in ("relu6", "hardtanh:-1,1")
        assert layout.num_gates == layout.num_units * (2 if three else 1)
        assert packed.gate_bits.shape[1] == -(-layout.num_gates // 8)
        assert bytes_per_sample(layout) == packed.nbytes // len(packed)
        if three:  # all three pieces occur with these inputs
            assert {0, 1, 2} <= set(torch.cat([g.flatten() for g in s.gates]).tolist())
        with torch.no_grad():  # the estimator under an unpacked structure gives the same outputs
            assert torch.equal(model.estimator(x, packed), net(x))


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_affine_in_input_under_fixed_structure(act):
    for spec in _specs(act):
        net = _net(spec).double()
        model = DecoupledModel.from_net(net)
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(8, spec.input_dim, generator=gen, dtype=torch.float64)
        d = torch.randn(8, spec.input_dim, generator=gen, dtype=torch.float64)
        s = model.selector.structure(x)
        with torch.no_grad():
            f = [model.estimator(x + t * d, s) for t in (0.0, 1.0, 2.0, -3.0)]
        assert torch.allclose(f[2] - 2 * f[1] + f[0], torch.zeros_like(f[0]), atol=1e-9)
        assert torch.allclose(f[3], f[0] - 3 * (f[1] - f[0]), atol=1e-9)
        assert (f[1] - f[0]).abs().max() > 1e-6  # not trivially constant


def test_piece_conventions_and_plain_relu_layout_unchanged():
    relu = StructureLayout.of(resolve_arch("mlp:5-7", 4, 2))
    assert relu.single_bit and relu.num_gates == 12  # today's one bit per ReLU
    packed = pack(Structure([torch.ones(3, 5, dtype=torch.bool), torch.zeros(3, 7, dtype=torch.bool)], []),
                  relu)
    assert packed.segments is None and packed.gate_bits.tolist() == [[0b11111000, 0]] * 3
    spec = ArchSpec((3,), ({"type": "linear", "out": 3}, {"type": "hardtanh", "min": 0.0, "max": 6.0},
                           {"type": "linear", "out": 1}))
    net = ReLUNet(spec)
    with torch.no_grad():
        net.blocks[0].weight.copy_(torch.eye(3))
        net.blocks[0].bias.zero_()
    s = DecoupledModel.from_net(net).selector.structure(torch.tensor([[-1.0, 3.0, 7.0], [0.0, 6.0, 6.5]]))
    assert s.gates[0].tolist() == [[0, 1, 2], [0, 2, 2]]  # at a breakpoint both pieces agree


def test_gate_flip_fraction_counts_piece_changes_per_unit():
    layout = StructureLayout.of(resolve_arch("mlp:4", 3, 2, "relu6"))
    a = Structure([torch.tensor([[0, 1, 2, 1]], dtype=torch.uint8)], [])
    b = Structure([torch.tensor([[2, 1, 2, 0]], dtype=torch.uint8)], [])  # two units moved (one by 2)
    assert gate_flip_fraction(pack(a, layout), pack(b, layout)) == 0.5


@pytest.mark.parametrize("train_from", ["all", -1])
@pytest.mark.parametrize("act", ["leaky_relu:0.1", "prelu", "relu6"])
def test_qk_retrain_leaves_selector_bit_identical(act, train_from):
    x, y = synthetic_arrays(300, dim=10, num_classes=3, hidden=16, seed=0)
    data = Split(torch.from_numpy(x), torch.from_numpy(y))
    train, val = data.subset(slice(0, 240)), data.subset(slice(240, 300))
    model = DecoupledModel.from_net(_net(resolve_arch("mlp:16-16", 10, 3, act)))
    before = copy.deepcopy(model.selector.state_dict())
    est_before = copy.deepcopy(model.estimator.state_dict())
    cfg = dataclasses.replace(TrainConfig(device="cpu", batch_size=64), qk_epochs=2, qk_lr=1e-2,
                              qk_train_from=train_from)
    train_qk(model, train, val, cfg)
    for k, v in model.selector.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = [k for k, v in model.estimator.state_dict().items() if not torch.equal(v, est_before[k])]
    assert changed
    with torch.no_grad():  # still the gated pair: the estimator under the selector's pieces
        x = val.x[:20]
        assert torch.equal(model(x), model.estimator(x, model.selector.structure(x)))
    if act == "prelu" and train_from == "all":  # PReLU slopes are estimator parameters epochs train
        assert any(k.endswith("1.weight") for k in changed), changed


def test_drift_patterns_count_piece_changes():
    from app.core.drift import gate_patterns, nearest_hamming

    spec = ArchSpec((2,), ({"type": "linear", "out": 2}, {"type": "hardtanh", "min": 0.0, "max": 6.0},
                           {"type": "linear", "out": 1}))
    net = ReLUNet(spec)
    with torch.no_grad():
        net.blocks[0].weight.copy_(torch.eye(2))
        net.blocks[0].bias.zero_()
    selector = DecoupledModel.from_net(net).selector
    bank = gate_patterns(selector, torch.tensor([[-1.0, 3.0]]))  # pieces (0, 1)
    query = gate_patterns(selector, torch.tensor([[7.0, 3.0], [1.0, 2.0]]))  # (2, 1): 2 crossings; (1, 1): 1
    assert bank.shape == (1, 4)
    assert nearest_hamming(query, bank).tolist() == [2 / 4, 1 / 4]


def test_structural_drift_per_layer_with_three_piece_layers():
    """The per-layer drift report (refresh's input) covers every activation layer, with the
    thermometer columns of 3-piece layers counted in their own layer."""
    from app.core.drift import structural_drift

    spec = ArchSpec((6,), ({"type": "linear", "out": 8}, {"type": "hardtanh", "min": 0.0, "max": 6.0},
                           {"type": "linear", "out": 5}, {"type": "leaky_relu", "alpha": 0.1},
                           {"type": "linear", "out": 2}))
    selector = DecoupledModel.from_net(_net(spec)).selector
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(400, 6, generator=gen) * 3
    report = structural_drift(selector, ref, torch.randn(200, 6, generator=gen) * 3 + 2.0)
    assert [(e["layer"], e["param_layer"], e["gates"]) for e in report.layers] == [(1, 0, 16), (3, 2, 5)]


@pytest.mark.parametrize("act", ["leaky_relu:0.1", "prelu", "relu6"])
def test_explain_is_exact_for_piecewise_nets_without_radius(act):
    """output = offset + A(x)·x under the frozen pieces; the certified radius is only for ReLU
    nets so far (NaN here, never a wrong number)."""
    from app.core.explain import Explainer

    for spec in _specs(act)[:2]:
        model = DecoupledModel.from_net(_net(spec).double())
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(4, spec.input_dim, dtype=torch.float64, generator=gen) * 3
        e = Explainer(model).explain(x)
        with torch.no_grad():
            assert torch.allclose(e.outputs, model(x), atol=1e-9)
        assert torch.allclose(e.offset + torch.einsum("nkd,nd->nk", e.jacobian, x), e.outputs, atol=1e-9)
        assert torch.isnan(e.radius_l2).all()
