"""The convex readout solvers against reference solutions (scikit-learn, numpy lstsq)."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from app.core.qk_readout import fit_logistic, fit_ridge, logistic_objective


def _problem(n=240, d=6, k=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(k, d, generator=g, dtype=dtype)
    logits = x @ w.T + 0.7 * torch.randn(n, k, generator=g, dtype=dtype)  # noisy: not separable
    return x, logits.argmax(1)


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_logistic_matches_sklearn(l2):
    x, y = _problem()
    n = x.shape[0]
    fit = fit_logistic(x, y, 3, l2=l2, max_iter=500, tol=1e-10)
    ref = LogisticRegression(C=1.0 / (l2 * n), tol=1e-12, max_iter=10_000).fit(x.numpy(), y.numpy())
    assert fit.converged
    np.testing.assert_allclose(fit.weight.numpy(), ref.coef_, atol=1e-5)
    # biases are unpenalised, so only defined up to a shared constant: compare centred
    b, rb = fit.bias.numpy(), ref.intercept_
    np.testing.assert_allclose(b - b.mean(), rb - rb.mean(), atol=1e-5)
    ref_obj = logistic_objective(x, y, torch.from_numpy(ref.coef_), torch.from_numpy(ref.intercept_), l2)
    assert fit.objective <= ref_obj + 1e-9


def test_logistic_warm_start_decreases_objective_and_respects_budget():
    x, y = _problem(dtype=torch.float32)
    w0 = torch.randn(3, 6) * 0.1
    b0 = torch.zeros(3)
    start = logistic_objective(x, y, w0, b0, 1e-4)
    fit = fit_logistic(x, y, 3, l2=1e-4, weight0=w0, bias0=b0, max_iter=3)
    assert fit.iterations <= 3
    assert fit.objective < start
    assert fit.objective == pytest.approx(logistic_objective(x, y, fit.weight, fit.bias, 1e-4), rel=1e-5)
    assert torch.equal(w0, w0.clone())  # inputs untouched


def test_logistic_from_optimum_stays_put():
    x, y = _problem()
    fit = fit_logistic(x, y, 3, l2=1e-2, max_iter=500, tol=1e-10)
    again = fit_logistic(x, y, 3, l2=1e-2, weight0=fit.weight, bias0=fit.bias, max_iter=5, tol=1e-8)
    assert again.iterations == 0 and again.converged
    assert torch.allclose(again.weight, fit.weight)


def test_ridge_matches_lstsq():
    x, y = _problem(n=120, d=5, k=4, seed=3)
    n, d = x.shape
    l2 = 0.05
    w, b = fit_ridge(x, y, 4, l2=l2)
    a = np.hstack([x.numpy(), np.ones((n, 1))])
    target = np.eye(4)[y.numpy()]
    # min (1/n)||A θ - Y||² + l2 ||W||²  ⇔  lstsq on [A; sqrt(n·l2)·M] θ = [Y; 0]
    reg = np.hstack([np.sqrt(n * l2) * np.eye(d), np.zeros((d, 1))])
    theta, *_ = np.linalg.lstsq(np.vstack([a, reg]), np.vstack([target, np.zeros((d, 4))]), rcond=None)
    np.testing.assert_allclose(w.numpy(), theta[:d].T, atol=1e-8)
    np.testing.assert_allclose(b.numpy(), theta[d], atol=1e-8)
