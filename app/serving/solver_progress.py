"""A retrain's progress as its solver really runs it, for the job row (``GET /retrain/{id}``).

- ``qk`` (the default ``fast`` solver, :mod:`app.core.qk_fast`) has no epochs:

  1. ``"phase": "features"`` — one chunked pass of the frozen selector over the training and
     validation rows, ``rows_done`` / ``rows_total``. Counted by a forward hook on the
     selector's first parameter layer, which every chunk of that pass goes through (whether
     the estimator still shares the selector's hidden layers or runs gated after it);
  2. ``"phase": "refit"`` — the convex readout refit (L-BFGS, at most
     ``refit_max_iterations``, early-stopped on the validation loss). The solver reports once,
     when it ends: ``refit_iterations`` run, ``refit_best_iteration`` kept (0: the champion's
     readout stayed), ``train_loss``, ``val_loss``, ``val_acc``;
  3. only with gradient epochs after the refit (``TrainConfig.qk_epochs`` > 0, not the
     default): ``"phase": "epochs"``, ``epoch`` k of ``epochs``.

- ``full`` trains every weight for up to ``SKQK_RETRAIN_EPOCHS`` epochs:
  ``"phase": "training"``, ``epoch`` k of ``epochs`` with the losses after each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from app.core.network import ReLUNet
from app.core.qk_fast import param_layers

Report = Callable[..., None]


def _scores(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("train_loss", "val_loss", "val_acc", "val_rmse") if k in m}


class QKProgress:
    """Context manager around a QK solve: counts the feature pass, relays the refit's result."""

    def __init__(self, report: Report, selector_net: ReLUNet, rows_total: int, max_iterations: int,
                 epochs: int = 0, min_interval_s: float = 0.5) -> None:
        self.report, self.net, self.rows_total = report, selector_net, rows_total
        self.max_iterations, self.epochs, self.min_interval_s = max_iterations, epochs, min_interval_s
        self.rows_done = 0
        self._last = 0.0
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._in_features = True

    def __enter__(self) -> QKProgress:
        first = self.net.blocks[param_layers(self.net)[0]]
        self._handle = first.register_forward_hook(self._counted)
        self.report(phase="features", rows_done=0, rows_total=self.rows_total)
        self._last = time.monotonic()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()  # the champion's selector serves on: leave no hook behind

    def _counted(self, _module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
        if not self._in_features:
            return
        self.rows_done = min(self.rows_done + int(inputs[0].shape[0]), self.rows_total)
        if self.rows_done >= self.rows_total:  # the pass is over: the refit starts
            self._in_features = False
            self.report(phase="refit", rows_done=self.rows_done, refit_max_iterations=self.max_iterations)
        elif time.monotonic() - self._last >= self.min_interval_s:  # one job-row write per interval
            self._last = time.monotonic()
            self.report(rows_done=self.rows_done)

    def on_epoch(self, m: dict[str, Any]) -> None:
        """The solver's per-stage callback (``app.core.qk_fast``)."""
        if m.get("stage") == "readout":
            self._in_features = False
            self.report(phase="refit", rows_done=self.rows_total, refit_max_iterations=self.max_iterations,
                        refit_iterations=m.get("readout_iterations"),
                        refit_best_iteration=m.get("readout_best_iteration"),
                        refit_kept=m.get("kept"), **_scores(m))
        else:  # gradient epochs after the refit: the solver numbers them from 2
            self.report(phase="epochs", epoch=int(m["epoch"]) - 1, epochs=self.epochs, **_scores(m))


def full_epoch_reporter(report: Report, epochs: int) -> Callable[[dict[str, Any]], None]:
    """The per-epoch callback of a full retrain."""

    def on_epoch(m: dict[str, Any]) -> None:
        report(phase="training", epoch=m["epoch"], epochs=epochs, **_scores(m))

    return on_epoch
