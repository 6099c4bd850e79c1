"""Refresh retrain: re-learn the structure only where it moved, then refit the QK readout.

Between a QK retrain (structure frozen, readout refit: fast, but short where inputs shift) and
a full retrain (every weight, many epochs) lies the case where the gates of *some* layers no
longer fit the data: under a brightness or offset shift the first layer's firing rates move
most (``DriftReport.layers``), the deeper layers' much less. A refresh

1. picks the parameter layers whose gates drifted (:func:`choose_layers`: per-layer
   firing-rate ratio above a threshold; at least the most drifted one),
2. fine-tunes only those layers' weights (and the readout, which has to follow its inputs)
   for a small fixed budget of Adam epochs on old + new data, warm-started from the serving
   net; every other layer is frozen and stays bit-identical,
3. copies the result into a new frozen selector and estimator and refits the readout on the
   new structure (the convex QK refit of :mod:`app.core.qk_fast`), so QK after a refresh is
   exact: the selector is frozen again and the readout is the one the QK solver found.

Chosen by measurement (docs/EXPERIMENTS.md, "Refresh"): the variants tried were first-layer-only,
drifted-layers(+readout) and all-layer budgets; this module is the kept design.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.core.data import Split
from app.core.device import pick_device
from app.core.drift import DriftThresholds
from app.core.network import DecoupledModel, ReLUNet
from app.core.tasks import check_task, evaluate_task, loss_fn
from app.core.training import (
    CancelCheck,
    EpochCallback,
    TrainConfig,
    TrainResult,
    _run_epochs,
    train_qk_fast,
)

PARAM_TYPES = ("linear", "conv")


@dataclass(frozen=True)
class RefreshConfig:
    """How much a refresh re-learns (defaults chosen in docs/EXPERIMENTS.md)."""

    epochs: int = 2  # Adam epochs on the refreshed layers (the best epoch on validation loss kept)
    lr: float = 1e-3
    layer_ratio: float = 3.0  # a layer is refreshed when its gates' firing-rate ratio exceeds this
    max_layers: int | None = None  # refresh at most this many drifted layers, the lowest (None: all)
    train_readout: bool = True  # the readout learns along (then it is refit anyway)
    old_per_new: float | None = 1.0  # refresh epochs see every new row and this many old rows per
    # new row (None: all rows); the readout refit afterwards always sees all of them


def budget_rows(is_new: torch.Tensor, old_per_new: float | None, seed: int = 0) -> torch.Tensor:
    """Row positions a refresh epoch trains on: every new row plus a seeded random sample of
    ``old_per_new`` old rows per new row (all rows when None or when that covers them)."""
    n = int(is_new.numel())
    new_rows = torch.nonzero(is_new, as_tuple=False).flatten()
    old_rows = torch.nonzero(~is_new, as_tuple=False).flatten()
    if old_per_new is None or new_rows.numel() == 0:
        return torch.arange(n)
    k = round(old_per_new * new_rows.numel())
    if k >= old_rows.numel():
        return torch.arange(n)
    pick = torch.randperm(old_rows.numel(), generator=torch.Generator().manual_seed(seed))[:k]
    return torch.sort(torch.cat([old_rows[pick], new_rows])).values


def param_layers(spec_layers: Sequence[dict[str, Any]]) -> list[int]:
    """Spec indices of the layers with weights (the last one is the readout)."""
    return [i for i, layer in enumerate(spec_layers) if layer["type"] in PARAM_TYPES]


def choose_layers(drift_layers: Iterable[dict[str, Any]], threshold: float,
                  max_layers: int | None = None) -> tuple[list[int], str]:
    """(parameter layers to refresh, why) from :attr:`DriftReport.layers`.

    The lowest ``max_layers`` parameter layers (None: all) whose gates' firing-rate ratio
    exceeds ``threshold``; if none exceeds it, the most drifted one (a refresh was asked for).
    Measured (docs/EXPERIMENTS.md): on MLPs the first layer alone did as well as every drifted
    layer, at a little less cost; on LeNet-5 the first conv alone fell short of QK while every
    drifted layer came within 0.4 points of the full retrain, hence all by default. A gated
    layer with no single parameter owner (after an ``add``) is skipped.
    """
    entries = [e for e in drift_layers if int(e["param_layer"]) >= 0]
    if not entries:
        raise ValueError("no gated layer with its own weights: nothing to refresh")
    chosen = sorted({int(e["param_layer"]) for e in entries if float(e["rate_ratio"]) > threshold})
    if chosen:
        ratios = ", ".join(f"layer {int(e['param_layer'])}: {float(e['rate_ratio']):.1f}" for e in entries)
        kept = chosen if max_layers is None else chosen[:max_layers]
        return kept, f"firing-rate ratio > {threshold:g} ({ratios}); refreshing {kept}"
    top = max(entries, key=lambda e: float(e["rate_ratio"]))
    return [int(top["param_layer"])], (f"no layer's firing-rate ratio exceeds {threshold:g}; the most "
                                       f"drifted one (layer {int(top['param_layer'])}: "
                                       f"{float(top['rate_ratio']):.2f})")


def trained_layers(net: ReLUNet, layers: Sequence[int], train_readout: bool) -> list[int]:
    """The spec indices whose weights a refresh updates by gradient (sorted, validated)."""
    owners = param_layers(net.spec.layers)
    bad = [i for i in layers if i not in owners]
    if bad:
        raise ValueError(f"layers {bad} have no weights; parameter layers are {owners}")
    out = set(layers)
    if train_readout:
        out.add(owners[-1])
    return sorted(out)


def refresh_layers(net: ReLUNet, train: Split, val: Split, cfg: TrainConfig, layers: Sequence[int],
                   refresh: RefreshConfig = RefreshConfig(), on_epoch: EpochCallback | None = None,
                   should_cancel: CancelCheck | None = None) -> TrainResult:
    """Fine-tune only the weights of ``layers`` (+ readout, per ``refresh``) in place.

    Every other parameter gets no gradient and is not handed to the optimiser, so it stays
    bit-identical (tested). Early stopping on the validation loss restores the best epoch.
    """
    device = pick_device(cfg.device)
    net.to(device)
    train, val = train.to(device), val.to(device)
    task = check_task(cfg.task)
    trained = trained_layers(net, layers, refresh.train_readout)
    net.requires_grad_(False)
    params: list[torch.nn.Parameter] = []
    for i in trained:
        for p in net.blocks[i].parameters():
            p.requires_grad_(True)
            params.append(p)

    def forward(x: torch.Tensor, _rows: torch.Tensor) -> torch.Tensor:
        return net(x)

    def val_eval() -> dict[str, float]:
        return evaluate_task(forward, val.x, val.y, task, net.to_layer_space, cfg.eval_batch_size)

    budget = dataclasses.replace(cfg, epochs=refresh.epochs, lr=refresh.lr, patience=max(1, refresh.epochs))
    try:
        result = _run_epochs(net, params, forward, loss_fn(task, net.to_layer_space), val_eval, train,
                             budget, on_epoch, should_cancel)
    finally:
        net.requires_grad_(False)
    result.solver = "refresh"
    return result


def start_net(model: DecoupledModel) -> ReLUNet:
    """The net a refresh warm-starts from: the estimator while its hidden layers are the
    selector's (it carries the latest readout refit), else the selector's own net."""
    source = model.estimator.net if model.shares_hidden_layers() else model.selector.net
    net = copy.deepcopy(source)
    net.eval()
    return net


def refresh_retrain(model: DecoupledModel, train: Split, val: Split, cfg: TrainConfig, layers: Sequence[int],
                    refresh: RefreshConfig = RefreshConfig(), on_epoch: EpochCallback | None = None,
                    should_cancel: CancelCheck | None = None,
                    on_refit: EpochCallback | None = None,
                    is_new: torch.Tensor | None = None,
                    start: ReLUNet | None = None) -> tuple[DecoupledModel, TrainResult]:
    """Steps 2–3 of the module doc: a new decoupled model whose selector is the refreshed net.

    Returns the candidate and a result whose history holds the refresh epochs then the refit
    (``stage: "readout"``); ``wall_s`` covers both. ``is_new`` (bool per train row): which rows
    arrived since the selector was trained, for the row budget of :func:`budget_rows`.
    ``start``: the net to refresh in place (default :func:`start_net` of ``model``).
    """
    t0 = time.perf_counter()
    net = start if start is not None else start_net(model)
    epoch_rows = train if is_new is None else train.subset(budget_rows(is_new.cpu(), refresh.old_per_new,
                                                                        cfg.seed).to(train.x.device))
    stage = refresh_layers(net, epoch_rows, val, cfg, layers, refresh, on_epoch, should_cancel)
    candidate = DecoupledModel.from_net(net.cpu())  # selector frozen again: QK on it is exact
    refit = train_qk_fast(candidate, train, val, dataclasses.replace(cfg, qk_epochs=0), on_refit,
                          should_cancel)
    candidate.cpu()
    result = dataclasses.replace(stage, history=[*stage.history, *refit.history], solver="refresh",
                                 readout_s=refit.readout_s, structure_s=refit.structure_s,
                                 wall_s=time.perf_counter() - t0)
    if refit.best_val_loss < stage.best_val_loss:
        result.best_val_loss, result.best_val_acc = refit.best_val_loss, refit.best_val_acc
    return candidate, result


def changed_layers(before: ReLUNet, after: ReLUNet) -> list[int]:
    """Spec indices of the parameter layers whose weights differ (bitwise) between two nets."""
    return [i for i in param_layers(before.spec.layers)
            if not all(torch.equal(a, b) for a, b in zip(before.blocks[i].parameters(),
                                                          after.blocks[i].parameters(), strict=True))]


def _distribution_shift(drift: dict[str, Any], th: DriftThresholds) -> list[str]:
    """Which distribution signals trip their threshold (empty when too few rows to judge)."""
    if not drift.get("judged", True):
        return []
    limits = (("rate_ratio", th.rate_ratio), ("nn_ratio", th.nn_ratio), ("far_fraction", th.far_fraction))
    return [f"{k} {float(drift[k]):.2f} > {v}" for k, v in limits if float(drift[k]) > v]


def choose_mode(drift: dict[str, Any] | None, thresholds: DriftThresholds | None = None,
                refresh_fits: bool = True) -> tuple[str, str]:
    """``mode=auto``: (the mode to run, why), from the drift of the samples since the selector.

    * much new data (``volume_ratio`` above its threshold) → ``full``: the structure itself
      would improve (measured: QK 1.4–1.7 points short at volume 1; refresh is not calibrated
      there);
    * inputs shifted (a distribution signal trips) while the new data is small → ``refresh``:
      the drifted layers re-learn for a small budget, then the readout is refit (``full``
      instead when the rows do not fit the in-memory budget a refresh needs);
    * otherwise → ``qk``.
    """
    th = thresholds or DriftThresholds()
    if drift is None:
        return "qk", ("auto: qk, no drift to measure (no new samples since the selector was "
                      "trained, or its version records no data watermark)")
    volume = float(drift["volume_ratio"])
    if volume > th.volume_ratio:
        return "full", f"auto: full, much new data (volume_ratio {volume:.2f} > {th.volume_ratio})"
    shifted = _distribution_shift(drift, th)
    if shifted:
        layers = ", ".join(f"layer {e['param_layer']}: {float(e['rate_ratio']):.1f}"
                           for e in drift.get("layers", []))
        what = f"inputs shifted ({'; '.join(shifted)}; per-layer firing-rate ratios {layers})"
        if not refresh_fits:
            return "full", f"auto: full, {what}, and the rows exceed the in-memory budget of a refresh"
        return "refresh", (f"auto: refresh, {what} with little new data (volume_ratio {volume:.2f} <= "
                           f"{th.volume_ratio})")
    return "qk", f"auto: qk ({drift['reason']})"
