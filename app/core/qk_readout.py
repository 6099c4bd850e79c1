"""Convex readout solvers: the last (linear) layer of the estimator on fixed gated features.

With the structure frozen and the layers below the readout fixed, the estimator's logits are
``Φ Wᵀ + b`` for a fixed feature matrix Φ (the gated penultimate activations), so refitting
the readout is an ordinary multinomial logistic regression (or, for a closed form, a ridge
regression onto one-hot targets). Both are solved here on whatever device Φ lives on.

Objective of :func:`fit_logistic` (the scikit-learn convention, bias unpenalised)::

    mean_i CE(W φ_i + b, y_i) + (l2 / 2) · ||W||²          (= LogisticRegression(C=1/(l2·N)))

Solver: L-BFGS whose initial inverse Hessian is the inverse of Böhning's bound
``½ I_K ⊗ AᵀA/N + l2·M`` (A = [Φ, 1], M masks the bias), so the very first step is already a
majorise-minimise step with the right feature-space scaling, and a backtracking line search on
precomputed ``A·Dᵀ`` (every trial step costs one softmax, not one matrix product).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class ReadoutFit:
    weight: torch.Tensor  # [K, d]
    bias: torch.Tensor  # [K]
    objective: float  # training objective at the returned iterate
    iterations: int  # iterations run
    converged: bool
    best_iteration: int = -1  # with a validation set: iterate returned (0 = the warm start)
    val_loss: float = float("nan")  # with a validation set: its mean loss there
    l2: float = float("nan")  # ridge: the penalty chosen on the validation split


def _augment(phi: torch.Tensor) -> torch.Tensor:
    return torch.cat([phi, torch.ones(phi.shape[0], 1, dtype=phi.dtype, device=phi.device)], dim=1)


def _penalty_mask(d: int, like: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(d + 1, dtype=like.dtype, device=like.device)
    mask[-1] = 0.0
    return mask


def fit_ridge(phi: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-3
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge readout onto one-hot targets: min (1/N)·||A Θᵀ − Y||² + l2·||W||².

    Returns (weight [K, d], bias [K]). The bias is not penalised.
    """
    n, d = phi.shape
    a = _augment(phi.to(torch.float64))
    target = F.one_hot(y, num_classes).to(torch.float64)
    gram = a.T @ a / n + torch.diag(l2 * _penalty_mask(d, a))
    theta = torch.linalg.solve(gram, a.T @ target / n).T  # [K, d+1]
    theta = theta.to(phi.dtype)
    return theta[:, :d].contiguous(), theta[:, d].contiguous()


RIDGE_GRID = tuple(10.0 ** e for e in range(-7, 3))  # penalties relative to the mean feature power


def fit_ridge_select(phi: torch.Tensor, y: torch.Tensor, phi_val: torch.Tensor, y_val: torch.Tensor,
                     grid: tuple[float, ...] = RIDGE_GRID) -> ReadoutFit:
    """Regression readout: closed-form ridge, its penalty chosen on the validation split.

    min (1/N)·||A Θᵀ − Y||² + λ·||W||² for each λ = α · mean(diag ΦᵀΦ/N) (scale-free α from
    ``grid``); the Gram matrix is formed once in float64, each λ costs one (d+1)² solve. The
    λ with the lowest validation MSE wins. ``objective`` is its training MSE.
    """
    n, d = phi.shape
    a = _augment(phi.to(torch.float64))
    target = y.reshape(n, -1).to(torch.float64)
    gram = a.T @ a / n
    rhs = a.T @ target / n
    power = float(gram.diagonal()[:d].mean().clamp_min(1e-12))
    a_val = _augment(phi_val.to(torch.float64))
    t_val = y_val.reshape(y_val.shape[0], -1).to(torch.float64)
    mask = torch.diag(_penalty_mask(d, a))
    best: tuple[float, float, torch.Tensor] | None = None
    for i, alpha in enumerate(grid):
        try:
            theta = torch.linalg.solve(gram + alpha * power * mask + 1e-12 * torch.eye(d + 1, dtype=a.dtype,
                                                                                        device=a.device), rhs)
        except RuntimeError:  # singular at this penalty: a larger one will do
            continue
        val_mse = float(((a_val @ theta - t_val) ** 2).mean())
        if torch.isfinite(theta).all() and (best is None or val_mse < best[0]):
            best = (val_mse, alpha, theta)
            best_i = i
    if best is None:
        raise ValueError("ridge readout: no penalty gave a finite solution")
    val_mse, alpha, theta = best
    train_mse = float(((a @ theta - target) ** 2).mean())
    theta_t = theta.T.to(phi.dtype)  # [K, d+1]
    return ReadoutFit(theta_t[:, :d].contiguous(), theta_t[:, d].contiguous(), train_mse, len(grid), True,
                      best_i, val_mse, alpha * power)


def logistic_objective(phi: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       l2: float) -> float:
    logits = phi @ weight.T + bias
    return float(F.cross_entropy(logits, y) + 0.5 * l2 * (weight * weight).sum())


def _bound_cholesky(a: torch.Tensor, penalty: torch.Tensor, n: int) -> torch.Tensor:
    """Cholesky factor of ½·AᵀA/N + diag(penalty), formed in float64 (see ``bound_cholesky``)."""
    a64 = a.to(torch.float64)
    return bound_cholesky((a64.T @ a64) / n, penalty)


def bound_cholesky(gram: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of ``½·gram + diag(penalty)``, ``gram`` = AᵀA/N in float64.

    Outlier rows (features of 1e3…1e38) make the float32 Gram matrix lose positive
    definiteness to rounding; float64 plus a jitter that grows until the factorisation
    succeeds keeps the solver going whatever finite rows the store holds.
    """
    bound = 0.5 * gram + torch.diag(penalty.to(torch.float64))
    scale = float(bound.diagonal().abs().max().clamp_min(1.0))
    eye = torch.eye(bound.shape[0], dtype=torch.float64, device=bound.device)
    for jitter in (1e-8, 1e-6, 1e-4, 1e-2, 1.0):
        chol, info = torch.linalg.cholesky_ex(bound + jitter * scale * eye)
        if int(info) == 0:
            return chol
    raise ValueError("readout features are not finite; cannot refit the readout")


def fit_logistic(phi: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-4,
                 weight0: torch.Tensor | None = None, bias0: torch.Tensor | None = None,
                 max_iter: int = 100, tol: float = 1e-5, history: int = 10,
                 val: tuple[torch.Tensor, torch.Tensor] | None = None, val_patience: int = 5
                 ) -> ReadoutFit:
    """Multinomial logistic readout, warm-started from (weight0, bias0) when given.

    ``tol`` bounds the largest absolute entry of the gradient of the objective at exit.
    Runs in the dtype of ``phi`` (float32 is plenty for a warm-started refit; use float64
    for reference comparisons).

    With ``val = (phi_val, y_val)`` the solver early-stops along its own path: it returns the
    iterate (the warm start included) with the lowest validation cross-entropy, which is what
    epoch-wise early stopping does for gradient training, at the cost of one small product
    per iteration, and stops once ``val_patience`` iterations in a row did not improve it.
    Without it, it returns the last iterate (the minimiser, when converged).
    """
    n, d = phi.shape
    k = num_classes
    a = _augment(phi)
    dtype, device = a.dtype, a.device
    mask = _penalty_mask(d, a)
    theta = torch.zeros(k, d + 1, dtype=dtype, device=device)
    if weight0 is not None:
        theta[:, :d] = weight0.to(dtype)
    if bias0 is not None:
        theta[:, d] = bias0.to(dtype)
    onehot = F.one_hot(y, k).to(dtype)

    # Böhning-type bound in feature space: H ≤ I_K ⊗ (½·AᵀA/N + l2·M); factor it once.
    chol = _bound_cholesky(a, l2 * mask, n).to(dtype)

    def precondition(g: torch.Tensor) -> torch.Tensor:  # g: [K, d+1] → B⁻¹ g (per class row)
        return torch.cholesky_solve(g.T, chol).T

    def value_and_grad(logits: torch.Tensor, th: torch.Tensor) -> tuple[float, torch.Tensor]:
        logp = torch.log_softmax(logits, dim=1)
        value = -(logp * onehot).sum() / n + 0.5 * l2 * ((th * th) @ mask).sum()
        grad = (logp.exp() - onehot).T @ a / n + l2 * th * mask
        return float(value), grad

    a_val = _augment(val[0].to(dtype)) if val is not None else None

    def val_loss(th: torch.Tensor) -> float:
        assert a_val is not None and val is not None
        return float(F.cross_entropy(a_val @ th.T, val[1]))

    logits = a @ theta.T
    state = {"logits": logits}

    def line(th: torch.Tensor, direction: torch.Tensor) -> Callable[[float], tuple[torch.Tensor, float]]:
        ad = a @ direction.T  # [N, K]: logits move linearly along the direction

        def trial(step: float) -> tuple[torch.Tensor, float]:
            new_theta = th + step * direction
            new_logits = state["logits"] + step * ad
            logp = torch.log_softmax(new_logits, dim=1)
            state["trial"] = (new_logits, new_theta)
            penalty = 0.5 * l2 * ((new_theta * new_theta) @ mask).sum()
            return new_theta, float(-(logp * onehot).sum() / n + penalty)

        return trial

    def accept() -> tuple[float, torch.Tensor]:
        new_logits, new_theta = state["trial"]
        state["logits"] = new_logits
        return value_and_grad(new_logits, new_theta)

    value, grad = value_and_grad(logits, theta)
    return lbfgs_path(theta, value, grad, d, precondition, line, accept, max_iter=max_iter, tol=tol,
                      history=history, val_loss=val_loss if val is not None else None,
                      val_patience=val_patience)


LineSearch = Callable[[torch.Tensor, torch.Tensor], Callable[[float], tuple[torch.Tensor, float]]]


def lbfgs_path(theta: torch.Tensor, value: float, grad: torch.Tensor, d: int,
               precondition: Callable[[torch.Tensor], torch.Tensor], line: LineSearch,
               accept: Callable[[], tuple[float, torch.Tensor]], *, max_iter: int, tol: float, history: int,
               val_loss: Callable[[torch.Tensor], float] | None, val_patience: int) -> ReadoutFit:
    """The preconditioned L-BFGS of the logistic readout, whatever holds the data.

    ``line(theta, direction)`` returns a trial function ``step → (theta', objective)`` for a
    backtracking (Armijo) search; ``accept()`` gives (objective, gradient) at the last trial,
    which the search keeps. With ``val_loss`` the iterate with the lowest validation loss is
    returned (the warm start included), and ``val_patience`` iterations without improvement
    end the run; without it, the last iterate.
    """
    dtype = theta.dtype
    best_val = val_loss(theta) if val_loss is not None else float("nan")
    best_theta, best_it = theta, 0
    best_value = value
    s_hist: list[torch.Tensor] = []
    y_hist: list[torch.Tensor] = []
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        if float(grad.abs().max()) < tol:
            converged = True
            it -= 1
            break
        # L-BFGS two-loop recursion with the bound as the initial inverse Hessian.
        q = grad.clone()
        alphas = []
        for s, yv in zip(reversed(s_hist), reversed(y_hist), strict=True):
            rho = 1.0 / float((yv * s).sum())
            alpha = rho * float((s * q).sum())
            q -= alpha * yv
            alphas.append((rho, alpha))
        r = precondition(q)
        for (s, yv), (rho, alpha) in zip(zip(s_hist, y_hist, strict=True), reversed(alphas), strict=True):
            beta = rho * float((yv * r).sum())
            r += (alpha - beta) * s
        direction = -r
        slope = float((grad * direction).sum())
        if slope >= 0:  # not a descent direction: fall back to the plain bound step
            s_hist.clear()
            y_hist.clear()
            direction = -precondition(grad)
            slope = float((grad * direction).sum())
        trial = line(theta, direction)
        step = 1.0
        for _ in range(30):
            new_theta, new_value = trial(step)
            if new_value <= value + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            converged = True  # no decrease possible at float precision
            break
        new_value, new_grad = accept()
        s_vec, y_vec = new_theta - theta, new_grad - grad
        if float((s_vec * y_vec).sum()) > 1e-12:
            s_hist.append(s_vec)
            y_hist.append(y_vec)
            if len(s_hist) > history:
                s_hist.pop(0)
                y_hist.pop(0)
        rel = abs(value - new_value) / max(abs(value), 1e-12)
        theta, value, grad = new_theta, new_value, new_grad
        if val_loss is not None:
            current = val_loss(theta)
            if current < best_val:
                best_val, best_theta, best_it, best_value = current, theta, it, value
            elif it - best_it >= val_patience:
                break
        if rel < 10 * torch.finfo(dtype).eps:
            converged = True
            break
    if val_loss is None:
        best_theta, best_it, best_value = theta, it, value
    return ReadoutFit(best_theta[:, :d].contiguous(), best_theta[:, d].contiguous(), best_value, it,
                      converged, best_it, best_val)
