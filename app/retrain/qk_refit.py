"""The QK retrain of a job: the convex readout refit over cached feature chunks.

Same stage as :func:`app.core.qk_fast.train_qk_fast` with its defaults (readout only, no
gradient epochs), but Φ comes from :class:`~app.retrain.cached_features.CachedFeatures` and the
solvers of :mod:`app.core.qk_stream` pass over it chunk by chunk: warm-started from the
champion's readout, early-stopped on the validation loss, and kept only if that loss improved.

``SKQK_RETRAIN_REFIT_MAX_ROWS`` (default 200,000; 0 = always exact) bounds a refit's rows once
the training window is larger: every new row (id above the champion's watermark) stays, old
rows are kept by a hash of their id with probability p and weighted 1/p, so the objective is an
unbiased estimate of the full one and the same rows are drawn every time (deterministic, like
the splits). The refit starts from the champion's readout, which the old rows already shaped,
so a sample of them is enough to keep it there: the cost follows the new data, not the store
(bench/scale.py: the time and the holdout accuracy of both, docs/BENCHMARKS.md). Below the bound
the refit is exact (every row, weight 1). The job result's ``refit`` says which ran.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from app.core.network import DecoupledModel
from app.core.qk_stream import ChunkSource, fit_logistic_chunks, fit_ridge_chunks
from app.core.splits import mix
from app.core.training import TrainConfig, TrainingCancelled, TrainResult
from app.retrain.cached_features import CachedFeatures
from app.retrain.sample_stream import TRAIN, VAL

_SALT = np.int64(0x2545F4914F6CDD1D)  # independent of the split hash
_SCALE = 1 << 24


def budget_weights(ids: np.ndarray, roles: np.ndarray, watermark: int | None,
                   max_rows: int) -> RefitSample | None:
    """Per-row weights for the refit budget (None: no budget needed, every row counts 1)."""
    train = roles == TRAIN
    n_train = int(train.sum())
    if max_rows <= 0 or n_train <= max_rows:
        return None
    new = ids > (watermark or 0)
    n_new, n_old = int((train & new).sum()), int((train & ~new).sum())
    if n_old == 0:
        return None
    p = min(1.0, max(max_rows - n_new, max_rows // 2) / n_old)
    threshold = np.uint64(int(p * _SCALE))

    return RefitSample(p, threshold, watermark or 0, n_new=n_new, n_old=n_old)


def refit_summary(weights: RefitSample | None, roles: np.ndarray, max_rows: int) -> dict[str, Any]:
    """What the job result says about its refit: ``exact`` (every training row) or ``sampled``."""
    n_train = int((roles == TRAIN).sum())
    if weights is None:
        why = ("SKQK_RETRAIN_REFIT_MAX_ROWS=0" if max_rows <= 0
               else f"{n_train} training rows <= SKQK_RETRAIN_REFIT_MAX_ROWS={max_rows}")
        return {"kind": "exact", "train_rows": n_train, "max_rows": max_rows, "reason": why}
    return {"kind": "sampled", "train_rows": n_train, "max_rows": max_rows, "new_rows": weights.n_new,
            "old_rows": weights.n_old, "old_fraction": round(weights.p, 6),
            "expected_rows": round(weights.n_new + weights.p * weights.n_old),
            "reason": f"{n_train} training rows > SKQK_RETRAIN_REFIT_MAX_ROWS={max_rows}: every new row, "
                      f"old ones id-hashed at p={weights.p:.4f} weighted 1/p, warm start from the champion"}


class RefitSample:
    """Weights of the refit budget: new rows 1, old rows kept by id hash (probability p) at 1/p."""

    def __init__(self, p: float, threshold: np.uint64, watermark: int, n_new: int = 0,
                 n_old: int = 0) -> None:
        self.p, self.threshold, self.watermark = p, threshold, watermark
        self.n_new, self.n_old = n_new, n_old

    def __call__(self, block_ids: np.ndarray) -> np.ndarray:
        kept = (mix(block_ids ^ _SALT) % np.uint64(_SCALE)) < self.threshold
        w = np.where(kept, np.float32(1.0 / self.p), np.float32(0.0))
        return np.where(block_ids > self.watermark, np.float32(1.0), w).astype(np.float32)


def _val_scores(readout: torch.nn.Linear, source: ChunkSource, task: str) -> tuple[float, float]:
    """(loss, accuracy) of the readout on the validation chunks (weighted); accuracy NaN for regression."""
    loss = hits = count = 0.0
    with torch.no_grad():
        for phi, y, w in source():
            out = readout(phi)
            per_row = (F.cross_entropy(out, y, reduction="none") if task == "classification"
                       else ((out - y) ** 2).mean(dim=1))
            weight = torch.ones_like(per_row) if w is None else w.to(per_row.dtype)
            loss += float((per_row * weight).sum())
            count += float(weight.sum())
            if task == "classification":
                hits += float(((out.argmax(1) == y).to(weight.dtype) * weight).sum())
    if count == 0:
        return float("inf"), float("nan")
    return loss / count, (hits / count if task == "classification" else float("nan"))


def refit_readout(model: DecoupledModel, features: CachedFeatures, cfg: TrainConfig,
                  weights: RefitSample | None = None,
                  on_epoch: Callable[[dict[str, Any]], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> TrainResult:
    """Refit ``model``'s readout in place on the cached features; the solver's summary."""
    started = time.perf_counter()
    net = model.estimator.net
    readout = net.readout
    task = cfg.task

    def y_map(y: torch.Tensor) -> torch.Tensor:  # regression: the solver works in layer units
        return net.to_layer_space(y.reshape(y.shape[0], -1).to(readout.weight.dtype))

    mapped = y_map if task == "regression" else None
    fraction = weights.p if weights is not None else 1.0
    train = features.source(TRAIN, mapped, weights, fraction)
    val = features.source(VAL, mapped, weights, fraction)
    start_loss, start_acc = _val_scores(readout, val, task)
    result = TrainResult(solver="fast", best_val_loss=start_loss, best_val_acc=start_acc)
    if should_cancel is not None and should_cancel():
        raise TrainingCancelled("cancelled before epoch 1")
    t0 = time.perf_counter()
    d = readout.in_features
    with torch.no_grad():
        if task == "regression":
            fit = fit_ridge_chunks(train, val, d)
        else:
            fit = fit_logistic_chunks(train, d, readout.out_features, cfg.qk_readout_l2, readout.weight,
                                      readout.bias, max_iter=cfg.qk_readout_iters, val=val)
        old_w, old_b = readout.weight.clone(), readout.bias.clone()
        readout.weight.copy_(fit.weight.to(readout.weight.dtype))
        readout.bias.copy_(fit.bias.to(readout.bias.dtype))
    val_loss, val_acc = _val_scores(readout, val, task)
    train_loss = (fit.objective if task == "regression"
                  else fit.objective - 0.5 * cfg.qk_readout_l2 * float((fit.weight ** 2).sum()))
    kept = val_loss < start_loss
    if kept:
        result.best_epoch, result.best_val_loss, result.best_val_acc = 1, val_loss, val_acc
    else:  # the champion's readout stays
        with torch.no_grad():
            readout.weight.copy_(old_w)
            readout.bias.copy_(old_b)
    result.readout_s = time.perf_counter() - t0
    metrics = {"epoch": 1, "stage": "readout", "train_loss": train_loss, "val_loss": val_loss,
               "val_acc": val_acc, "readout_iterations": fit.iterations,
               "readout_best_iteration": fit.best_iteration, "kept": kept, "seconds": result.readout_s}
    result.history.append(metrics)
    if on_epoch is not None:
        on_epoch(metrics)
    result.wall_s = time.perf_counter() - started
    return result
