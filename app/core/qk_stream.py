"""The convex readout refits of :mod:`app.core.qk_readout`, over features that arrive in chunks.

A retrain over millions of samples cannot hold the feature matrix Φ in memory, so these
solvers never see it whole: they take a *chunk source*, a function that starts one pass over
the data and yields ``(phi, y, weight)`` chunks (``weight`` None: every row counts 1). Each
objective/gradient evaluation is one pass; memory is one chunk plus the ``(K, d+1)`` iterates.

- :func:`fit_logistic_chunks`: the same preconditioned L-BFGS as :func:`fit_logistic` (the
  Böhning bound ``½·AᵀA/N + l2·M``, accumulated chunk by chunk in float64, as the initial
  inverse Hessian; backtracking line search; early stopping on the validation loss). The
  in-memory solver tries line-search steps on cached logits; here every trial is a pass, which
  also yields the gradient at the accepted step, so an iteration usually costs one pass.
- :func:`fit_ridge_chunks`: the closed-form ridge with the penalty chosen on validation, from
  sufficient statistics (``AᵀA``, ``AᵀT``, ``ΣT²`` of both splits) gathered in one pass each.

Same objectives as the in-memory solvers, so on data that fits in memory they agree to solver
tolerance (tests/core/test_qk_stream.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.nn import functional as F

from app.core.qk_readout import RIDGE_GRID, ReadoutFit, _augment, _penalty_mask, bound_cholesky, lbfgs_path

Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # (phi [n, d], y, weight [n] | None)
ChunkSource = Callable[[], Iterable[Chunk]]


def _weighted(values: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return values if w is None else values * w.reshape(-1, *([1] * (values.dim() - 1))).to(values.dtype)


def _gram(source: ChunkSource, d: int) -> tuple[torch.Tensor, float]:
    """(AᵀA/N in float64, N) over one pass; N is the weight sum."""
    gram, n = None, 0.0
    for phi, _y, w in source():
        a = _augment(phi.to(torch.float64))
        part = _weighted(a, w).T @ a
        gram = part if gram is None else gram + part
        n += float(phi.shape[0]) if w is None else float(w.sum())
    if gram is None or n <= 0:
        raise ValueError("readout refit: no training rows")
    return gram / n, n


def fit_logistic_chunks(train: ChunkSource, d: int, num_classes: int, l2: float = 1e-4,
                        weight0: torch.Tensor | None = None, bias0: torch.Tensor | None = None,
                        max_iter: int = 100, tol: float = 1e-5, history: int = 10,
                        val: ChunkSource | None = None, val_patience: int = 5,
                        dtype: torch.dtype = torch.float32) -> ReadoutFit:
    """Multinomial logistic readout over chunked features (see the module doc and
    :func:`app.core.qk_readout.fit_logistic`, whose arguments and result these are)."""
    k = num_classes
    gram, n = _gram(train, d)
    theta = torch.zeros(k, d + 1, dtype=dtype)
    if weight0 is not None:
        theta[:, :d] = weight0.detach().cpu().to(dtype)
    if bias0 is not None:
        theta[:, d] = bias0.detach().cpu().to(dtype)
    mask = _penalty_mask(d, theta)
    chol = bound_cholesky(gram, l2 * mask).to(dtype)

    def precondition(g: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(g.T, chol).T

    def value_and_grad(th: torch.Tensor) -> tuple[float, torch.Tensor]:
        # logits Φ·Wᵀ + b without materialising A = [Φ, 1]: one read of each chunk per product
        weight, bias = th[:, :d], th[:, d]
        value, grad = 0.0, torch.zeros(k, d + 1, dtype=torch.float64)
        for phi, y, w in train():
            phi = phi.to(dtype)
            logp = torch.log_softmax(torch.addmm(bias, phi, weight.T), dim=1)
            picked = logp.gather(1, y[:, None])[:, 0]
            value -= float(_weighted(picked, w).sum())
            residual = logp.exp()
            residual[torch.arange(len(y)), y] -= 1.0  # softmax − one-hot
            residual = _weighted(residual, w)
            grad[:, :d] += (residual.T @ phi).to(torch.float64)
            grad[:, d] += residual.sum(0).to(torch.float64)
        value = value / n + 0.5 * l2 * float(((th * th) @ mask).sum())
        return value, (grad / n).to(dtype) + l2 * th * mask

    def val_loss(th: torch.Tensor) -> float:
        assert val is not None
        total, count = 0.0, 0.0
        for phi, y, w in val():
            ce = F.cross_entropy(torch.addmm(th[:, d], phi.to(dtype), th[:, :d].T), y, reduction="none")
            total += float(_weighted(ce, w).sum())
            count += float(phi.shape[0]) if w is None else float(w.sum())
        return total / max(count, 1e-12)

    last: dict[str, tuple[float, torch.Tensor]] = {}

    def line(th: torch.Tensor, direction: torch.Tensor) -> Callable[[float], tuple[torch.Tensor, float]]:
        def trial(step: float) -> tuple[torch.Tensor, float]:  # a pass, which also gives the gradient
            new_theta = th + step * direction
            last["trial"] = value_and_grad(new_theta)
            return new_theta, last["trial"][0]

        return trial

    value, grad = value_and_grad(theta)
    return lbfgs_path(theta, value, grad, d, precondition, line, lambda: last["trial"], max_iter=max_iter,
                      tol=tol, history=history, val_loss=val_loss if val is not None else None,
                      val_patience=val_patience)


def _moments(source: ChunkSource, d: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(AᵀA, AᵀT, ΣT², N) in float64 over one pass (targets [n, T])."""
    gram = rhs = None
    tt, n = 0.0, 0.0
    for phi, y, w in source():
        a = _augment(phi.to(torch.float64))
        t = y.reshape(y.shape[0], -1).to(torch.float64)
        aw = _weighted(a, w)
        g, r = aw.T @ a, aw.T @ t
        gram = g if gram is None else gram + g
        rhs = r if rhs is None else rhs + r
        tt += float(_weighted(t * t, w).sum())
        n += float(phi.shape[0]) if w is None else float(w.sum())
    if gram is None or rhs is None:
        raise ValueError("ridge readout: no rows")
    return gram, rhs, tt, n


def _mse(theta: torch.Tensor, gram: torch.Tensor, rhs: torch.Tensor, tt: float, n: float) -> float:
    """mean over rows and targets of (Aθ − T)², from the moments: (θᵀGθ − 2θᵀR + ΣT²)/(N·T)."""
    sse = float((theta * (gram @ theta)).sum() - 2 * (theta * rhs).sum()) + tt
    return max(sse, 0.0) / (n * theta.shape[1])


def fit_ridge_chunks(train: ChunkSource, val: ChunkSource, d: int,
                     grid: tuple[float, ...] = RIDGE_GRID) -> ReadoutFit:
    """Regression readout (:func:`app.core.qk_readout.fit_ridge_select`) over chunked features:
    one pass per split gathers the moments; each penalty then costs one (d+1)² solve."""
    gram_sum, rhs_sum, tt, n = _moments(train, d)
    gram_v, rhs_v, tt_v, n_v = _moments(val, d)
    gram, rhs = gram_sum / n, rhs_sum / n
    power = float(gram.diagonal()[:d].mean().clamp_min(1e-12))
    mask = torch.diag(_penalty_mask(d, gram))
    eye = torch.eye(d + 1, dtype=gram.dtype)
    best: tuple[float, float, torch.Tensor, int] | None = None
    for i, alpha in enumerate(grid):
        try:
            theta = torch.linalg.solve(gram + alpha * power * mask + 1e-12 * eye, rhs)
        except RuntimeError:  # singular at this penalty: a larger one will do
            continue
        val_mse = _mse(theta, gram_v, rhs_v, tt_v, n_v)
        if torch.isfinite(theta).all() and (best is None or val_mse < best[0]):
            best = (val_mse, alpha, theta, i)
    if best is None:
        raise ValueError("ridge readout: no penalty gave a finite solution")
    val_mse, alpha, theta, best_i = best
    train_mse = _mse(theta, gram_sum, rhs_sum, tt, n)
    theta_t = theta.T.to(torch.float32)
    return ReadoutFit(theta_t[:, :d].contiguous(), theta_t[:, d].contiguous(), train_mse, len(grid), True,
                      best_i, val_mse, alpha * power)
