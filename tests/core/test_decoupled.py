"""Correctness of the selector/estimator pair: equality, affinity, path decomposition."""

import itertools

import pytest
import torch

from app.core.network import DecoupledModel, Estimator, PathSelector, ReLUNet
from app.core.spec import lenet5, mlp, resolve_arch, vgg_small

torch.set_default_dtype(torch.float32)

SPECS = {
    "mlp": mlp([64, 32, 32, 10]),
    "lenet5-28": lenet5(28, 10),
    "lenet5-8": lenet5(8, 10),
    "vgg-small-8": vgg_small(8, 10),
    "vgg-small-28": vgg_small(28, 10),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_estimator_equals_plain_net_when_weights_equal(name):
    spec = SPECS[name]
    net = ReLUNet(spec, seed=1)
    model = DecoupledModel.from_net(net)
    x = torch.randn(37, spec.input_dim)
    with torch.no_grad():
        diff = (model(x) - net(x)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("name", list(SPECS))
def test_estimator_differs_when_weights_differ(name):
    # Guards the test above: the estimator really uses its own weights.
    spec = SPECS[name]
    model = DecoupledModel(PathSelector(ReLUNet(spec, seed=1)), Estimator(ReLUNet(spec, seed=2)))
    x = torch.randn(8, spec.input_dim)
    with torch.no_grad():
        assert (model(x) - model.selector(x)).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", list(SPECS))
def test_fixed_structure_is_affine_in_input(name):
    spec = SPECS[name]
    torch.manual_seed(0)
    model = DecoupledModel(PathSelector(ReLUNet(spec, seed=3)), Estimator(ReLUNet(spec, seed=4)))
    model.double()
    x1 = torch.randn(5, spec.input_dim, dtype=torch.float64)
    x2 = torch.randn(5, spec.input_dim, dtype=torch.float64) * 3
    structure = model.selector.structure(x1)
    f = lambda x: model.estimator(x, structure)  # noqa: E731
    with torch.no_grad():
        for a in (0.3, -1.7, 2.5):
            lhs = f(a * x1 + (1 - a) * x2)
            rhs = a * f(x1) + (1 - a) * f(x2)
            assert torch.allclose(lhs, rhs, atol=1e-9, rtol=1e-9)
        # and the plain net is not affine for these inputs (else the test proves nothing)
        plain = model.selector.net
        assert not torch.allclose(plain(0.3 * x1 + 0.7 * x2), 0.3 * plain(x1) + 0.7 * plain(x2),
                                  atol=1e-6)


def test_path_decomposition_tiny_mlp():
    """Output = Σ over active input→output paths of (Π weights)·x_i + Σ bias paths."""
    spec = mlp([3, 2, 2, 1])
    selector_net, estimator_net = ReLUNet(spec, seed=5).double(), ReLUNet(spec, seed=6).double()
    model = DecoupledModel(PathSelector(selector_net), Estimator(estimator_net))
    lin = [m for m in estimator_net.blocks if isinstance(m, torch.nn.Linear)]
    w = [m.weight.detach() for m in lin]
    b = [m.bias.detach() for m in lin]
    torch.manual_seed(7)
    x = torch.randn(20, 3, dtype=torch.float64)
    structure = model.selector.structure(x)
    for n in range(x.shape[0]):
        g1, g2 = structure.gates[0][n], structure.gates[1][n]
        total = b[2][0].item()  # output bias: a path of length zero
        for i, j, k in itertools.product(range(3), range(2), range(2)):  # input paths
            if g1[j] and g2[k]:
                total += x[n, i].item() * w[0][j, i].item() * w[1][k, j].item() * w[2][0, k].item()
        for j, k in itertools.product(range(2), range(2)):  # bias paths from layer 1
            if g1[j] and g2[k]:
                total += b[0][j].item() * w[1][k, j].item() * w[2][0, k].item()
        for k in range(2):  # bias paths from layer 2
            if g2[k]:
                total += b[1][k].item() * w[2][0, k].item()
        out = model.estimator(x[n:n + 1], structure.index(slice(n, n + 1))).item()
        assert out == pytest.approx(total, abs=1e-12)


def test_maxpool_gathers_at_selector_indices():
    spec = lenet5(8, 10)
    model = DecoupledModel(PathSelector(ReLUNet(spec, seed=1)), Estimator(ReLUNet(spec, seed=2)))
    x = torch.randn(4, 64)
    structure = model.selector.structure(x)
    # Indices are valid positions inside each pooled plane and inside their 2×2 window.
    idx = structure.pool_indices[0]
    assert idx.shape == (4, 6, 4, 4)
    rows, cols = idx // 8, idx % 8
    assert torch.equal(rows // 2, torch.arange(4).view(1, 1, 4, 1).expand_as(rows))
    assert torch.equal(cols // 2, torch.arange(4).view(1, 1, 1, 4).expand_as(cols))


def test_resolve_arch_and_json_roundtrip():
    spec = resolve_arch("mlp:784-256-256-10", 784, 10)
    assert spec.to_dict()["layers"][0] == {"type": "linear", "out": 256}
    assert resolve_arch("mlp:256-256", 784, 10) == spec
    from app.core.spec import ArchSpec

    for s in SPECS.values():
        assert ArchSpec.from_json(s.to_json()) == s
    with pytest.raises(ValueError, match="square"):
        resolve_arch("lenet5", 50, 10)
    with pytest.raises(ValueError, match="unknown type"):
        ArchSpec.from_dict({"input_shape": [4], "layers": [{"type": "tanh"}]})
    with pytest.raises(ValueError, match="last layer must be linear"):
        ArchSpec.from_dict({"input_shape": [4], "layers": [{"type": "linear", "out": 2},
                                                           {"type": "relu"}]})
