"""The chunked readout solvers agree with the in-memory ones (same objectives, same paths)."""

import numpy as np
import pytest
import torch

from app.core.qk_readout import fit_logistic, fit_ridge_select
from app.core.qk_stream import fit_logistic_chunks, fit_ridge_chunks
from app.core.stream_metrics import StreamMetrics
from app.core.tasks import evaluate_task


def _problem(n=600, d=8, k=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(k, d, generator=g, dtype=dtype)
    logits = x @ w.T + 0.7 * torch.randn(n, k, generator=g, dtype=dtype)
    return x, logits.argmax(1)


def _chunks(x, y, size, w=None):
    return lambda: ((x[i:i + size], y[i:i + size], None if w is None else w[i:i + size])
                    for i in range(0, x.shape[0], size))


@pytest.mark.parametrize("size", [7, 100, 10_000])
def test_logistic_chunks_follow_the_in_memory_path(size):
    x, y = _problem()
    xv, yv = _problem(n=150, seed=1)
    w0, b0 = torch.randn(4, 8, dtype=torch.float64) * 0.1, torch.zeros(4, dtype=torch.float64)
    ref = fit_logistic(x, y, 4, 1e-3, w0, b0, max_iter=15, val=(xv, yv))
    got = fit_logistic_chunks(_chunks(x, y, size), 8, 4, 1e-3, w0, b0, max_iter=15,
                              val=_chunks(xv, yv, size), dtype=torch.float64)
    assert got.iterations == ref.iterations and got.best_iteration == ref.best_iteration
    np.testing.assert_allclose(got.weight.numpy(), ref.weight.numpy(), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(got.bias.numpy(), ref.bias.numpy(), rtol=1e-7, atol=1e-9)
    assert got.objective == pytest.approx(ref.objective, rel=1e-9)


def test_logistic_weights_count_rows_that_many_times():
    x, y = _problem(n=200)
    twice = fit_logistic(torch.cat([x, x[:50]]), torch.cat([y, y[:50]]), 4, 1e-3, max_iter=200, tol=1e-10)
    w = torch.ones(200, dtype=torch.float64)
    w[:50] = 2.0
    got = fit_logistic_chunks(_chunks(x, y, 64, w), 8, 4, 1e-3, max_iter=200, tol=1e-10,
                              dtype=torch.float64)
    np.testing.assert_allclose(got.weight.numpy(), twice.weight.numpy(), atol=1e-6)


def test_ridge_chunks_equal_the_in_memory_ridge():
    g = torch.Generator().manual_seed(3)
    x, xv = torch.randn(500, 6, generator=g), torch.randn(120, 6, generator=g)
    beta = torch.randn(6, 2, generator=g)
    y = x @ beta + 0.3 * torch.randn(500, 2, generator=g)
    yv = xv @ beta + 0.3 * torch.randn(120, 2, generator=g)
    ref = fit_ridge_select(x, y, xv, yv)
    got = fit_ridge_chunks(_chunks(x, y, 33), _chunks(xv, yv, 33), 6)
    assert got.best_iteration == ref.best_iteration
    np.testing.assert_allclose(got.weight.numpy(), ref.weight.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.bias.numpy(), ref.bias.numpy(), rtol=1e-5, atol=1e-6)
    assert got.val_loss == pytest.approx(ref.val_loss, rel=1e-6)
    assert got.objective == pytest.approx(ref.objective, rel=1e-6)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_stream_metrics_equal_evaluate_task(task):
    g = torch.Generator().manual_seed(5)
    out = torch.randn(301, 3, generator=g)
    y = (torch.randint(0, 3, (301,), generator=g) if task == "classification"
         else torch.randn(301, 3, generator=g))
    to_layer = (lambda t: (t - 1.0) / 2.0) if task == "regression" else None
    ref = evaluate_task(lambda _x, rows: out[rows], out, y, task, to_layer, batch_size=64)
    meter = StreamMetrics(task, to_layer)
    for i in range(0, 301, 50):
        meter.add(out[i:i + 50], y[i:i + 50])
    got = meter.result()
    assert set(got) == set(ref)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
