"""Input normalisation and output scale inside the model; regression training and readout."""

import numpy as np
import pytest
import torch

from app.core.data import Split
from app.core.network import DecoupledModel, Estimator, PathSelector, ReLUNet
from app.core.qk_readout import fit_ridge_select
from app.core.spec import ArchSpec, lenet5, mlp
from app.core.tasks import evaluate_task
from app.core.training import TrainConfig, train_full, train_qk
from app.serving.holder import MLPForward, compile_for_inference


def with_affines(spec: ArchSpec, seed: int = 0, outputs: bool = True) -> ArchSpec:
    gen = np.random.default_rng(seed)
    norm = (gen.normal(5, 3, spec.input_dim).tolist(), gen.uniform(0.5, 40, spec.input_dim).tolist())
    out = (gen.normal(100, 10, spec.num_outputs).tolist(), gen.uniform(1, 50, spec.num_outputs).tolist())
    return spec.with_affines(norm, out if outputs else None)


SPECS = {"mlp": with_affines(mlp([12, 16, 16, 3])), "lenet5-8": with_affines(lenet5(8, 4))}


def raw_inputs(spec: ArchSpec, n: int, dtype=torch.float32) -> torch.Tensor:
    mean, std = (torch.tensor(v, dtype=dtype) for v in spec.input_norm)
    return mean + std * torch.randn(n, spec.input_dim, dtype=dtype)


def test_spec_roundtrip_keeps_affines_and_old_specs_unchanged():
    spec = SPECS["mlp"]
    assert ArchSpec.from_dict(spec.to_dict()) == spec
    plain = mlp([12, 16, 3])
    assert set(plain.to_dict()) == {"name", "input_shape", "layers"}  # old stored specs stay as they were
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        plain.with_affines(([0.0] * 12, [0.0] * 12))


@pytest.mark.parametrize("name", list(SPECS))
def test_estimator_equals_plain_net_with_affines(name):
    spec = SPECS[name]
    net = ReLUNet(spec, seed=1)
    model = DecoupledModel.from_net(net)
    x = raw_inputs(spec, 29)
    with torch.no_grad():
        expected = net(x)
        manual = net.plain_layers(((x - net.in_mean) * net.in_inv_std).reshape(29, *spec.input_shape),
                                  len(spec.layers)) * net.out_scale + net.out_shift
        assert torch.allclose(expected, manual, rtol=1e-5, atol=1e-4)  # the maps really apply
        assert (model(x) - expected).abs().max().item() <= 1e-5 * float(expected.abs().max())


@pytest.mark.parametrize("name", list(SPECS))
def test_fixed_structure_is_affine_in_raw_input(name):
    spec = SPECS[name]
    model = DecoupledModel(PathSelector(ReLUNet(spec, seed=3)), Estimator(ReLUNet(spec, seed=4))).double()
    x1, x2 = raw_inputs(spec, 5, torch.float64), raw_inputs(spec, 5, torch.float64)
    structure = model.selector.structure(x1)
    f = lambda x: model.estimator(x, structure)  # noqa: E731
    with torch.no_grad():
        for a in (0.3, -1.7, 2.5):
            assert torch.allclose(f(a * x1 + (1 - a) * x2), a * f(x1) + (1 - a) * f(x2), atol=1e-8, rtol=1e-9)


def test_serving_fast_forward_applies_the_affines():
    spec = SPECS["mlp"]
    model = DecoupledModel(PathSelector(ReLUNet(spec, seed=5)), Estimator(ReLUNet(spec, seed=6))).eval()
    runner = compile_for_inference(model, torch.device("cpu"))
    assert isinstance(runner, MLPForward)
    x = raw_inputs(spec, 40)
    with torch.no_grad():
        assert torch.allclose(runner(x), model(x), rtol=1e-4, atol=1e-3)


def test_serving_fast_forward_takes_one_pass_exactly_when_hidden_layers_are_shared():
    spec = SPECS["mlp"]
    model = DecoupledModel(PathSelector(ReLUNet(spec, seed=5)), Estimator(ReLUNet(spec, seed=5))).eval()
    with torch.no_grad():  # a readout-only QK retrain: only the last layer differs
        model.estimator.net.blocks[-1].weight.mul_(1.5)
    x = raw_inputs(spec, 40)
    runner = compile_for_inference(model, torch.device("cpu"))
    assert isinstance(runner, MLPForward) and runner.shared
    with torch.no_grad():
        one_pass = runner(x)
        runner.shared = False  # the two-pass gated estimator on the same weights
        assert torch.equal(one_pass, runner(x))
        assert torch.allclose(one_pass, model(x), rtol=1e-5, atol=1e-6)
        model.estimator.net.blocks[0].bias.add_(0.1)  # a hidden layer moves: two passes again
    assert not compile_for_inference(model, torch.device("cpu")).shared


def test_ridge_readout_picks_penalty_on_validation_and_solves_it_exactly():
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(400, 10, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 10, generator=gen, dtype=torch.float64)
    y = phi @ w.T + 0.5 + 0.1 * torch.randn(400, 2, generator=gen, dtype=torch.float64)
    fit = fit_ridge_select(phi[:300], y[:300], phi[300:], y[300:])
    # the returned weights are the ridge solution at the chosen penalty (bias unpenalised)
    a = torch.cat([phi[:300], torch.ones(300, 1, dtype=torch.float64)], 1)
    pen = torch.diag(torch.tensor([fit.l2] * 10 + [0.0], dtype=torch.float64))
    theta = torch.linalg.solve(a.T @ a / 300 + pen, a.T @ y[:300] / 300).T
    assert torch.allclose(fit.weight, theta[:, :10], atol=1e-8)
    assert torch.allclose(fit.bias, theta[:, 10], atol=1e-8)
    assert fit.val_loss < 0.02  # noise variance 0.01


def regression_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = np.random.default_rng(seed)
    x = gen.normal(50, 20, (n, 6)).astype(np.float32)
    z = (x - 50) / 20
    y = 300 + 80 * np.abs(z[:, 0]) - 40 * z[:, 1] * (z[:, 2] > 0) + 5 * gen.standard_normal(n)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.float32)[:, None])


def test_regression_full_then_qk_in_target_units():
    x, y = regression_data(3000, 0)
    spec = mlp([6, 32, 32, 1]).with_affines(
        (x.mean(0).tolist(), x.std(0).tolist()), ([float(y.mean())], [float(y.std())]))
    train, val = Split(x[:2400], y[:2400]), Split(x[2400:], y[2400:])
    net = ReLUNet(spec, seed=0)
    cfg = TrainConfig(epochs=40, task="regression", device="cpu", patience=10)
    train_full(net, train, val, cfg)
    m = evaluate_task(lambda xb, _r: net(xb), val.x, val.y, "regression")
    assert m["r2"] > 0.8 and m["rmse"] < 0.5 * float(y.std())

    model = DecoupledModel.from_net(net)
    selector_before = [p.clone() for p in model.selector.parameters()]
    x2, y2 = regression_data(1500, 1)
    y2 = y2 + 25.0  # the new data says: everything is 25 higher
    new_train = Split(torch.cat([train.x, x2[:1200]]), torch.cat([train.y, y2[:1200]]))
    new_val = Split(x2[1200:], y2[1200:])
    before = evaluate_task(lambda xb, _r: model(xb), new_val.x, new_val.y, "regression")
    train_qk(model, new_train, new_val, cfg)
    after = evaluate_task(lambda xb, _r: model(xb), new_val.x, new_val.y, "regression")
    assert after["rmse"] < before["rmse"]
    assert all(torch.equal(a, b) for a, b in zip(selector_before, model.selector.parameters(), strict=True))
