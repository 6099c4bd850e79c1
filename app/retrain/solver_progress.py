"""A retrain's progress as its solver really runs it, for the job row (``GET /retrain/{id}``).

- ``qk`` has no epochs; the job reports it itself (:mod:`app.retrain.job`):

  1. ``"phase": "features"`` — the feature cache is brought up to date: ``rows_computed`` /
     ``rows_to_compute`` rows run through the network (the blocks of ids the cache lacks);
     once the split is known, ``rows_done`` = ``rows_total`` = training + validation rows;
  2. ``"phase": "refit"`` — the convex readout refit (L-BFGS, at most
     ``refit_max_iterations``, early-stopped on the validation loss). The solver reports once,
     when it ends: ``refit_iterations`` run, ``refit_best_iteration`` kept (0: the champion's
     readout stayed), ``train_loss``, ``val_loss``, ``val_acc``.

- ``full`` trains every weight for up to ``SKQK_RETRAIN_EPOCHS`` epochs:
  ``"phase": "training"``, ``epoch`` k of ``epochs`` with the losses after each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Report = Callable[..., None]


def _scores(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("train_loss", "val_loss", "val_acc", "val_rmse") if k in m}


def full_epoch_reporter(report: Report, epochs: int) -> Callable[[dict[str, Any]], None]:
    """The per-epoch callback of a full retrain."""

    def on_epoch(m: dict[str, Any]) -> None:
        report(phase="training", epoch=m["epoch"], epochs=epochs, **_scores(m))

    return on_epoch
