"""``mode=refresh`` inside a retrain job, and ``mode=auto``'s choice among qk, refresh and full.

The math is :mod:`app.core.refresh`; this module brings the job's rows to it (in memory, like
an in-memory full retrain), reports the phases (``refresh`` epochs, then ``refit``) and says
which layers it re-learnt. The retrain job calls :func:`run_refresh` and ``choose_mode``
(:func:`app.core.refresh.choose_mode`, pure: the experiments ask it too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from app.core.network import DecoupledModel
from app.core.refresh import RefreshConfig, choose_layers, choose_mode, refresh_retrain, trained_layers
from app.core.training import TrainConfig, TrainResult
from app.retrain.sample_stream import TRAIN, VAL, DataWindow
from app.retrain.streamed_data import load_role
from app.storage import Store


def refresh_config(settings: Any) -> RefreshConfig:
    return RefreshConfig(epochs=settings.retrain_refresh_epochs, lr=settings.retrain_lr,
                         max_layers=settings.retrain_refresh_max_layers or None,
                         old_per_new=settings.retrain_refresh_old_per_new or None)


def run_refresh(store: Store, settings: Any, window: DataWindow, block_ids: int, ids: np.ndarray,
                champion: DecoupledModel, drift: dict[str, Any] | None, cfg: TrainConfig,
                report: Callable[..., None],
                should_cancel: Callable[[], bool] | None
                ) -> tuple[DecoupledModel, TrainResult, dict[str, Any]]:
    """Refresh the champion on the window's rows (``ids``: the window's ids in order); (candidate,
    result, what it did)."""
    if drift is None or not drift.get("layers"):
        raise ValueError("mode=refresh needs the drift of new samples since the selector was trained "
                         "(none: no new samples, or the selector's version records no data watermark); "
                         "use mode=qk or full")
    rc = refresh_config(settings)
    layers, why = choose_layers(drift["layers"], rc.layer_ratio, rc.max_layers)
    trained = trained_layers(champion.selector.net, layers, rc.train_readout)
    report(phase="loading", refresh_layers=layers, refresh_trained_layers=trained, refresh_reason=why)
    train = load_role(store, window, TRAIN, block_ids)
    val = load_role(store, window, VAL, block_ids)
    train_ids = ids[window.roles(ids) == TRAIN]  # load_role returns the rows in id order
    is_new = torch.from_numpy(np.asarray(train_ids > int(drift["selector_watermark"])))
    if len(train_ids) != len(train):
        raise RuntimeError(f"refresh: {len(train)} training rows read, {len(train_ids)} expected")
    report(phase="refresh", epochs=rc.epochs)

    def on_epoch(m: dict[str, Any]) -> None:
        if m.get("stage") == "readout":
            report(phase="refit", refit_iterations=m.get("readout_iterations"),
                   refit_best_iteration=m.get("readout_best_iteration"))
        else:
            report(phase="refresh", epoch=m.get("epoch"), epochs=rc.epochs,
                   **{k: m[k] for k in ("train_loss", "val_loss", "val_acc") if k in m})

    candidate, result = refresh_retrain(champion, train, val, cfg, layers, rc, on_epoch, should_cancel,
                                        on_epoch, is_new=is_new)
    info = {"layers": layers, "trained_layers": trained, "reason": why, "epochs": rc.epochs,
            "old_per_new": rc.old_per_new, "rows_new": int(is_new.sum()), "rows_train": len(train)}
    return candidate, result, info


__all__ = ["choose_mode", "refresh_config", "run_refresh"]
