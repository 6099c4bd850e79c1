"""Exact explanations (app.core.explain) in float64: the identity, finite differences inside the
certified radius, and tightness of the radius (a step just past it changes the structure)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.core.explain import Explainer, cost_per_row, group_columns, total_units
from app.core.network import DecoupledModel, ReLUNet
from app.core.spec import ArchSpec, lenet5, mlp
from app.core.structure import Structure

CONV_POOL = ArchSpec(input_shape=(2, 8, 8), layers=(  # a pool straight on a conv: real margins
    {"type": "conv", "out": 4, "kernel": 3, "padding": 1},
    {"type": "maxpool", "kernel": 2},
    {"type": "relu"},
    {"type": "conv", "out": 5, "kernel": 3, "padding": 1},
    {"type": "maxpool", "kernel": 3, "stride": 2, "padding": 1},
    {"type": "relu"},
    {"type": "flatten"},
    {"type": "linear", "out": 12},
    {"type": "relu"},
    {"type": "linear", "out": 3},
), name="conv-pool")


def _decoupled(spec: ArchSpec, seed: int, shared: bool = True) -> DecoupledModel:
    model = DecoupledModel.from_net(ReLUNet(spec, seed=seed))
    if not shared:  # a QK retrain that moved hidden weights too: estimator ≠ selector below the readout
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.estimator.net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.double().eval()


def _imported(name: str, tmp_path: Path) -> DecoupledModel:
    from app.intake.networks.torch_export_import import import_pt2
    from tests.importers.nets import trained

    net, shape = trained(name)
    x = torch.randn(2, *shape)
    path = tmp_path / f"{name}.pt2"
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    return DecoupledModel.from_net(import_pt2(path).build()).double().eval()


def _models(tmp_path: Path) -> dict[str, DecoupledModel]:
    norm_mlp = mlp([7, 16, 16, 3]).with_affines(([0.5] * 7, [2.0] * 7), ([1.0] * 3, [3.0] * 3))
    return {
        "mlp": _decoupled(mlp([7, 16, 16, 3]), 0),
        "mlp-normalised-unshared": _decoupled(norm_mlp, 1, shared=False),
        "lenet5": _decoupled(lenet5(8, 4), 2),
        "conv-pool": _decoupled(CONV_POOL, 3),
        "conv-pool-unshared": _decoupled(CONV_POOL, 4, shared=False),
    }


def _same(a: Structure, b: Structure) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.gates + a.pool_indices, b.gates + b.pool_indices,
                                                  strict=True))


def check_exact(model: DecoupledModel, x: torch.Tensor) -> None:
    ex = Explainer(model).explain(x, chunk_rows=2)  # chunks of 2: the concatenation is covered too
    y = model(x)
    torch.testing.assert_close(ex.outputs, y, rtol=1e-12, atol=1e-12)
    # the identity, with an offset computed independently (the piece at x = 0)
    affine = torch.einsum("nkd,nd->nk", ex.jacobian, x) + ex.offset
    torch.testing.assert_close(affine, y, rtol=1e-10, atol=1e-10)
    ref = x.mean(0, keepdim=True)
    contrib, intercept = ex.contributions(x, ref)
    torch.testing.assert_close(intercept + contrib.sum(-1), y, rtol=1e-10, atol=1e-10)
    assert (ex.radius_l2 > 0).all() and (ex.radius_linf > 0).all()
    assert (ex.radius_linf <= ex.radius_l2 + 1e-15).all()  # ‖δ‖∞ ≤ ‖δ‖₂: the L∞ ball is the smaller
    assert ((ex.active_units >= 0) & (ex.active_units <= total_units(model.spec))).all()
    base = model.selector.structure(x)
    gen = torch.Generator().manual_seed(0)
    for i in range(x.shape[0]):
        xi, r2, rinf = x[i:i + 1], float(ex.radius_l2[i]), float(ex.radius_linf[i])
        a = ex.jacobian[i]
        # contributions = finite differences of the model, feature by feature, inside the radius
        h = 0.5 * min(r2, rinf)
        eye = torch.eye(x.shape[1], dtype=x.dtype)
        fd = (model(xi + h * eye) - model(xi - h * eye)) / (2 * h)  # [D, K]
        torch.testing.assert_close(fd.T, a, rtol=1e-7, atol=1e-9)
        # any step inside the ball: same structure, output moves by exactly A·δ
        u = torch.randn(1, x.shape[1], generator=gen, dtype=x.dtype)
        for delta in (0.99 * r2 * u / u.norm(), 0.99 * rinf * torch.sign(u)):
            assert _same(model.selector.structure(xi + delta), base.index(slice(i, i + 1)))
            torch.testing.assert_close(model(xi + delta) - model(xi), delta @ a.T, rtol=1e-8, atol=1e-10)
        # tight: just short of the radius along the boundary direction nothing changes, just past it
        # the structure does
        for r, d in ((r2, ex.direction_l2[i]), (rinf, ex.direction_linf[i])):
            assert _same(model.selector.structure(xi + (1 - 1e-6) * r * d), base.index(slice(i, i + 1)))
            assert not _same(model.selector.structure(xi + (1 + 1e-6) * r * d), base.index(slice(i, i + 1)))
        assert abs(float(ex.direction_l2[i].norm()) - 1) < 1e-12
        assert float(ex.direction_linf[i].abs().max()) == 1.0


@pytest.mark.parametrize("name", ["mlp", "mlp-normalised-unshared", "lenet5", "conv-pool",
                                  "conv-pool-unshared"])
def test_exact_and_certified_on_built_nets(tmp_path: Path, name: str) -> None:
    model = _models(tmp_path)[name]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, model.spec.input_dim, generator=gen, dtype=torch.float64) * 2
    check_exact(model, x)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_exact_and_certified_on_imported_nets(tmp_path: Path, name: str) -> None:
    """Imported graphs: BatchNorm folded, padded max-pool, avg-pool, residual adds, GAP."""
    model = _imported(name, tmp_path)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, model.spec.input_dim, generator=gen, dtype=torch.float64)
    check_exact(model, x)


def test_radius_is_zero_on_a_unit_exactly_at_its_threshold() -> None:
    """x = 0 in a net without first-layer biases: every first-layer unit sits at z = 0."""
    model = _decoupled(mlp([4, 8, 2]), 5)
    with torch.no_grad():
        model.selector.net.blocks[0].bias.zero_()
    ex = Explainer(model).explain(torch.zeros(1, 4, dtype=torch.float64))
    assert float(ex.radius_l2[0]) == 0.0 and float(ex.radius_linf[0]) == 0.0


def test_float32_identity_within_1e5() -> None:
    model = DecoupledModel.from_net(ReLUNet(lenet5(8, 3), seed=1)).eval()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    ex = Explainer(model).explain(x)
    contrib, intercept = ex.contributions(x, torch.zeros(1, 64))
    scale = intercept.abs() + contrib.abs().sum(-1)
    assert ((intercept + contrib.sum(-1) - model(x)).abs() <= 1e-5 * scale).all()


def test_grouping_and_costs() -> None:
    v = torch.arange(12.0).view(2, 6)
    grouped = group_columns(v, torch.tensor([0, 1, 1, 2, 2, 2]), 3)
    assert grouped.tolist() == [[0.0, 3.0, 12.0], [6.0, 15.0, 30.0]]
    spec = mlp([10, 32, 4])
    assert cost_per_row(spec) == 10 * (32 + 32)
    assert total_units(spec) == 32


@pytest.mark.parametrize("name", ["mlp-normalised-unshared", "conv-pool-unshared"])
def test_without_radius_the_same_map_from_reverse_passes(tmp_path: Path, name: str) -> None:
    model = _models(tmp_path)[name]
    x = torch.randn(3, model.spec.input_dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    full, fast = Explainer(model).explain(x), Explainer(model).explain(x, radius=False)
    torch.testing.assert_close(fast.jacobian, full.jacobian, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.offset, full.offset, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.outputs, full.outputs)
    assert torch.equal(fast.active_units, full.active_units)
    assert fast.radius_l2.isnan().all() and fast.radius_linf.isnan().all()
