"""The fast QK solver: learns, never touches the selector, keeps the gated-estimator forward."""

import copy
import dataclasses

import pytest
import torch

from app.core.data import Split, synthetic_arrays
from app.core.network import DecoupledModel, Estimator, PathSelector, ReLUNet
from app.core.qk_fast import QKFastConfig, cache_split, readout_features, run_layers, train_qk_fast
from app.core.qk_readout import fit_logistic
from app.core.spec import lenet5, mlp
from app.core.training import TrainConfig, TrainingCancelled, evaluate, train_full, train_qk

CFG = TrainConfig(device="cpu", batch_size=64)


def _toy(n=600, dim=12, classes=3, seed=0, shift=0.0) -> tuple[Split, Split]:
    x, y = synthetic_arrays(n, dim=dim, num_classes=classes, hidden=16, seed=seed, shift=shift)
    s = Split(torch.from_numpy(x), torch.from_numpy(y))
    return s.subset(slice(0, n * 4 // 5)), s.subset(slice(n * 4 // 5, n))


def _trained_pair(spec, train, val, epochs=3) -> DecoupledModel:
    net = ReLUNet(spec, seed=0)
    train_full(net, train, val, dataclasses.replace(CFG, epochs=epochs), track_stability=False)
    return DecoupledModel.from_net(net)


def _val_loss(model, val):
    return evaluate(lambda x, _r: model(x), val)[0]


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same(module, snapshot):
    for k, v in module.state_dict().items():
        assert torch.equal(v, snapshot[k]), k  # bit-identical


@pytest.mark.parametrize("epochs", [0, 4])
def test_fast_solver_reduces_loss_and_never_touches_selector(epochs):
    old, _ = _toy(seed=0)
    train, val = _toy(n=900, seed=1)
    model = _trained_pair(mlp([12, 32, 32, 3]), old, val, epochs=2)
    selector_before = _snapshot(model.selector)
    loss_before = _val_loss(model, val)
    result = train_qk(model, train, val, dataclasses.replace(CFG, qk_epochs=epochs, qk_lr=1e-3))
    _assert_same(model.selector, selector_before)
    assert all(p.grad is None and not p.requires_grad for p in model.selector.parameters())
    assert result.solver == "fast" and result.structure_s > 0
    assert result.best_epoch >= 1  # the refit (or an epoch) beat the starting estimator
    assert _val_loss(model, val) < loss_before
    assert result.best_val_loss == pytest.approx(_val_loss(model, val), rel=1e-4)


def test_readout_only_changes_only_the_readout_and_matches_direct_solve():
    train, val = _toy(n=900, seed=2)
    model = _trained_pair(mlp([12, 24, 16, 3]), *_toy(seed=5), epochs=2)
    est_before = _snapshot(model.estimator.net)
    phi = readout_features(model, train.x)
    head = model.estimator.net.blocks[-1]
    # the features are the gated estimator's: readout(Φ) reproduces the decoupled forward
    with torch.no_grad():
        assert torch.allclose(head(phi), model(train.x), atol=1e-5)
    phi_val = readout_features(model, val.x)
    expected = fit_logistic(phi, train.y, 3, 1e-4, head.weight.detach(), head.bias.detach(), max_iter=20,
                            val=(phi_val, val.y))
    assert expected.best_iteration >= 1
    cfg = QKFastConfig(readout_iters=20, readout_l2=1e-4)
    result = train_qk_fast(model, train.x, train.y, val.x, val.y, cfg)
    assert result.best_epoch == 1
    after = model.estimator.net.state_dict()
    last = f"blocks.{len(model.spec.layers) - 1}."
    for k, v in after.items():
        if not k.startswith(last):
            assert torch.equal(v, est_before[k]), k
    assert torch.allclose(head.weight, expected.weight, atol=1e-6)
    assert torch.allclose(head.bias, expected.bias, atol=1e-6)


def test_readout_path_stops_at_best_validation_iterate():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    y = (x[:, 0] > 0).long()
    noisy = torch.where(torch.rand(300, generator=g) < 0.3, 1 - y, y)  # train labels: 30 % flipped
    xv = torch.randn(200, 8, generator=g)
    yv = (xv[:, 0] > 0).long()
    w0, b0 = torch.zeros(2, 8), torch.zeros(2)
    path = fit_logistic(x, noisy, 2, 1e-4, w0, b0, max_iter=30, val=(xv, yv))
    last = fit_logistic(x, noisy, 2, 1e-4, w0, b0, max_iter=30)
    assert 0 <= path.best_iteration <= path.iterations
    ce = torch.nn.functional.cross_entropy
    assert path.val_loss == pytest.approx(float(ce(xv @ path.weight.T + path.bias, yv)), rel=1e-5)
    assert path.val_loss <= float(ce(xv @ last.weight.T + last.bias, yv)) + 1e-7
    assert path.val_loss <= float(ce(xv @ w0.T + b0, yv)) + 1e-7


def test_refit_that_hurts_the_holdout_is_rejected():
    train, _ = _toy(n=900, seed=3)
    model = _trained_pair(mlp([12, 32, 3]), train, train, epochs=4)
    bad_val = Split(train.x[:200], (train.y[:200] + 1) % 3)  # holdout disagrees with train labels
    head = model.estimator.net.blocks[-1]
    w, b = head.weight.detach().clone(), head.bias.detach().clone()
    result = train_qk(model, train, bad_val, CFG)
    assert result.history[0]["stage"] == "readout" and not result.history[0]["kept"]
    assert result.best_epoch == 0
    assert torch.equal(head.weight, w) and torch.equal(head.bias, b)


def test_epochs_on_top_layers_keep_frozen_prefix_and_work_on_cnn_with_packed_pools():
    train, val = _toy(n=300, dim=64, seed=4)
    model = DecoupledModel.from_net(ReLUNet(lenet5(8, 3), seed=0))
    sel_before, est_before = _snapshot(model.selector), _snapshot(model.estimator.net)
    fast = QKFastConfig(readout_iters=5, epochs=2, lr=1e-3, train_from=-3, batch_size=32,
                        cache_budget_bytes=0)  # 0: masks stay bool, pool choices stay packed
    result = train_qk_fast(model, train.x, train.y, val.x, val.y, fast)
    _assert_same(model.selector, sel_before)
    first_trained = result.train_from
    for k, v in model.estimator.net.state_dict().items():
        if int(k.split(".")[1]) < first_trained:
            assert torch.equal(v, est_before[k]), k
    assert [h["stage"] for h in result.history][:2] == ["readout", "epochs"]


def test_cached_split_reproduces_the_gated_forward():
    _, val = _toy(n=200, dim=64, seed=6)
    spec = lenet5(8, 3)
    model = DecoupledModel(PathSelector(ReLUNet(spec, seed=1)), Estimator(ReLUNet(spec, seed=2)))
    net = model.estimator.net
    for start, budget in ((0, 1 << 30), (3, 1 << 30), (3, 0)):
        cached = cache_split(model, val.x, val.y, start, budget)
        idx = torch.arange(len(val))
        h, g, p = cached.rows(idx)
        with torch.no_grad():
            out = run_layers(net, h, g, p, start, len(net.spec.layers))
            assert torch.allclose(out, model(val.x), atol=1e-5), (start, budget)


def test_solver_choice_adam_still_available_and_unknown_rejected():
    train, val = _toy()
    model = _trained_pair(mlp([12, 16, 3]), train, val, epochs=1)
    before = _snapshot(model.selector)
    result = train_qk(model, train, val, dataclasses.replace(CFG, qk_solver="adam", epochs=2))
    assert result.solver == "adam" and len(result.history) == 2
    _assert_same(model.selector, before)
    with pytest.raises(ValueError, match="qk_solver"):
        train_qk(model, train, val, dataclasses.replace(CFG, qk_solver="sgd"))


def test_fast_solver_honours_cancel():
    train, val = _toy()
    model = _trained_pair(mlp([12, 16, 3]), train, val, epochs=1)
    with pytest.raises(TrainingCancelled):
        train_qk(model, train, val, CFG, should_cancel=lambda: True)
    copy.deepcopy(model)  # still a usable model


@pytest.mark.parametrize("spec", [mlp([12, 16, 8, 3]), lenet5(8, 3)], ids=["mlp", "lenet"])
def test_readout_features_one_pass_and_two_pass_agree_with_the_decoupled_forward(spec):
    x = torch.rand(50, spec.input_dim) * 2 - 0.5
    model = DecoupledModel.from_net(ReLUNet(spec, seed=0))
    head = model.estimator.net.blocks[-1]
    with torch.no_grad():
        head.weight.mul_(-2.0)  # readout differs: still the one-pass (shared hidden layers) path
        assert torch.allclose(head(readout_features(model, x)), model(x), atol=1e-5)
        model.estimator.net.blocks[0].weight.add_(0.05)  # hidden layer differs: two-pass path
        assert torch.allclose(head(readout_features(model, x)), model(x), atol=1e-5)
