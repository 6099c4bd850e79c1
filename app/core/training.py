"""Training: full (SK + QK) training of a ReLU net, and QK-only training of an Estimator.

Both Adam loops share one epoch driver: seeded mini-batches, a validation split, early
stopping on validation loss with the best weights restored, per-epoch metrics, a cancel hook.
Full training also records SK stability (Hypothesis 1) on a fixed probe set.

The default QK retrain (``TrainConfig.qk_solver = "fast"``, :mod:`app.core.qk_fast`) does not
run Adam epochs by default: with the structure frozen, the readout is a convex problem on the
gated features, refit in closed form (preconditioned L-BFGS) in a fraction of one epoch. The
previous solver stays available as ``qk_solver = "adam"`` (:func:`train_qk_adam`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from app.core.data import Split
from app.core.device import pick_device
from app.core.network import DecoupledModel, PathSelector, ReLUNet
from app.core.qk_fast import QKFastConfig
from app.core.qk_fast import train_qk_fast as train_qk_fast_impl
from app.core.structure import PackedStructure, gate_flip_fraction, pool_flip_fraction
from app.core.tasks import LossFn, check_task, evaluate_task, loss_fn

EpochCallback = Callable[[dict[str, Any]], None]
CancelCheck = Callable[[], bool]
ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, row indices) → logits


class TrainingCancelled(RuntimeError):
    """Raised between epochs when the cancel hook says so."""


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5  # epochs without validation-loss improvement before stopping
    seed: int = 0
    device: str | None = None  # None/"auto": CUDA when available
    probe_size: int = 512  # samples whose gates are tracked for SK stability
    eval_batch_size: int = 4096
    # QK-only retrain (train_qk). "fast": convex readout refit (+ optional epochs) on the
    # cached structure; "adam": mini-batch Adam on every estimator weight (epochs/lr above).
    qk_solver: str = "fast"
    qk_readout_iters: int = 20  # L-BFGS iterations of the readout refit (0: none)
    qk_readout_l2: float = 1e-4  # L2 on the readout weights (mean-loss scale)
    qk_epochs: int = 0  # "fast": Adam epochs after the refit (batch_size/patience above)
    qk_lr: float = 1e-4  # "fast": learning rate of those epochs
    qk_train_from: int | str = "all"  # "fast": first trained layer ("all", spec index, -k)
    task: str = "classification"  # or "regression" (MSE; readout refit = ridge)


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    best_val_acc: float = 0.0
    wall_s: float = 0.0
    structure_s: float = 0.0  # time spent computing the cached structure (QK only)
    solver: str = "adam"  # "full", "adam" (QK) or "fast" (QK)
    readout_s: float = 0.0  # "fast": time of the convex readout refit

    def summary(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
                "best_val_acc": self.best_val_acc, "epochs_run": len(self.history),
                "wall_s": self.wall_s, "structure_s": self.structure_s, "solver": self.solver,
                "readout_s": self.readout_s}


def evaluate(forward: ForwardFn, data: Split, batch_size: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``forward`` on ``data`` (classification)."""
    m = evaluate_task(forward, data.x, data.y, "classification", batch_size=batch_size)
    return m["loss"], m["acc"]


ValEval = Callable[[], dict[str, float]]


class EarlyStopping:
    """Validation-loss early stopping: records the best epoch in ``result`` and keeps its weights."""

    def __init__(self, module: nn.Module, result: TrainResult, patience: int) -> None:
        self.module, self.result, self.patience = module, result, patience
        self.best_state = copy.deepcopy(module.state_dict())  # the start counts as epoch 0
        self.stale = 0

    def update(self, epoch: int, val: dict[str, float]) -> bool:
        """Record this epoch's validation metrics; True when ``patience`` epochs brought no gain."""
        if val["loss"] < self.result.best_val_loss:
            self.result.best_val_loss, self.result.best_epoch = val["loss"], epoch
            self.result.best_val_acc = val.get("acc", float("nan"))
            self.best_state = copy.deepcopy(self.module.state_dict())
            self.stale = 0
        else:
            self.stale += 1
        return self.stale >= self.patience

    def end_epoch(self, epoch: int, val: dict[str, float], metrics: dict[str, Any],
                  on_epoch: EpochCallback | None) -> bool:
        """History, best epoch, the caller's callback; True: stop training."""
        self.result.history.append(metrics)
        stop = self.update(epoch, val)
        if on_epoch is not None:
            on_epoch(metrics)
        return stop

    def restore_best(self) -> None:
        self.module.load_state_dict(self.best_state)


def _run_epochs(module: nn.Module, params: list[nn.Parameter], train_fwd: ForwardFn, loss: LossFn,
                val_eval: ValEval, train: Split, cfg: TrainConfig,
                on_epoch: EpochCallback | None, should_cancel: CancelCheck | None,
                extra_metrics: Callable[[], dict[str, Any]] | None = None) -> TrainResult:
    """Adam epochs; ``val_eval()`` → metrics on the validation split (``loss`` drives stopping)."""
    result = TrainResult()
    start = time.perf_counter()
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    stopping = EarlyStopping(module, result, cfg.patience)
    for epoch in range(1, cfg.epochs + 1):
        if should_cancel is not None and should_cancel():
            raise TrainingCancelled(f"cancelled before epoch {epoch}")
        epoch_start = time.perf_counter()
        module.train()
        order = torch.randperm(len(train), generator=generator).to(train.x.device)
        loss_sum = 0.0
        for i in range(0, len(train), cfg.batch_size):
            rows = order[i:i + cfg.batch_size]
            batch_loss = loss(train_fwd(train.x[rows], rows), train.y[rows])
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            loss_sum += float(batch_loss.detach()) * rows.numel()
        module.eval()
        val = val_eval()
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / len(train),
                                   **{f"val_{k}": v for k, v in val.items()}}
        if extra_metrics is not None:
            metrics.update(extra_metrics())
        metrics["seconds"] = time.perf_counter() - epoch_start
        if stopping.end_epoch(epoch, val, metrics, on_epoch):
            break
    stopping.restore_best()
    result.wall_s = time.perf_counter() - start
    return result


class StabilityTracker:
    """Per-epoch SK drift of a net on a fixed probe set (Hypothesis 1)."""

    def __init__(self, net: ReLUNet, probe_x: torch.Tensor) -> None:
        self.net = net
        self.probe_x = probe_x
        self.prev_structure = self._structure()
        self.prev_params = net.param_vector()

    def _structure(self) -> PackedStructure:
        return PathSelector(self.net).packed_structure(self.probe_x)

    def step(self) -> dict[str, float]:
        current, params = self._structure(), self.net.param_vector()
        metrics = {
            "gate_flip": gate_flip_fraction(self.prev_structure, current),
            "pool_flip": pool_flip_fraction(self.prev_structure, current),
            "weight_rel_change": float((params - self.prev_params).norm()
                                       / self.prev_params.norm().clamp_min(1e-12)),
        }
        self.prev_structure, self.prev_params = current, params
        return metrics


def train_full(net: ReLUNet, train: Split, val: Split, cfg: TrainConfig,
               on_epoch: EpochCallback | None = None, should_cancel: CancelCheck | None = None,
               track_stability: bool = True) -> TrainResult:
    """Train every weight (SK and QK move together): the paper's step 1 and full retrain."""
    device = pick_device(cfg.device)
    net.to(device)
    train, val = train.to(device), val.to(device)
    tracker = StabilityTracker(net, val.x[:cfg.probe_size]) if track_stability else None
    task = check_task(cfg.task)

    def forward(x: torch.Tensor, _rows: torch.Tensor) -> torch.Tensor:
        return net(x)

    def val_eval() -> dict[str, float]:
        return evaluate_task(forward, val.x, val.y, task, net.to_layer_space, cfg.eval_batch_size)

    result = _run_epochs(net, list(net.parameters()), forward, loss_fn(task, net.to_layer_space),
                         val_eval, train, cfg, on_epoch, should_cancel, tracker.step if tracker else None)
    result.solver = "full"
    return result


def train_qk_adam(model: DecoupledModel, train: Split, val: Split, cfg: TrainConfig,
                  on_epoch: EpochCallback | None = None,
                  should_cancel: CancelCheck | None = None) -> TrainResult:
    """QK-only training: the estimator learns under the frozen selector's cached structure.

    The structure of the training and validation sets is computed once (paper step 3) and
    kept bit-packed on the device; each mini-batch unpacks its rows (step 4).
    """
    device = pick_device(cfg.device)
    model.to(device)
    train, val = train.to(device), val.to(device)
    t0 = time.perf_counter()
    train_cache = model.selector.packed_structure(train.x)
    val_cache = model.selector.packed_structure(val.x)
    structure_s = time.perf_counter() - t0
    estimator = model.estimator

    def train_fwd(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return estimator(x, train_cache.index(rows))

    def val_fwd(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return estimator(x, val_cache.index(rows))

    task = check_task(cfg.task)
    to_layer = estimator.net.to_layer_space

    def val_eval() -> dict[str, float]:
        return evaluate_task(val_fwd, val.x, val.y, task, to_layer, cfg.eval_batch_size)

    result = _run_epochs(estimator, list(estimator.parameters()), train_fwd, loss_fn(task, to_layer),
                         val_eval, train, cfg, on_epoch, should_cancel)
    result.solver = "adam"
    result.structure_s = structure_s
    result.wall_s += structure_s
    return result


def train_qk_fast(model: DecoupledModel, train: Split, val: Split, cfg: TrainConfig,
                  on_epoch: EpochCallback | None = None,
                  should_cancel: CancelCheck | None = None) -> TrainResult:
    """QK-only retrain by :mod:`app.core.qk_fast`: convex readout refit (+ optional epochs)."""
    device = pick_device(cfg.device)
    model.to(device)
    train, val = train.to(device), val.to(device)

    def check_cancel(epoch: int) -> None:
        if should_cancel is not None and should_cancel():
            raise TrainingCancelled(f"cancelled before epoch {epoch}")

    fast = QKFastConfig(readout_iters=cfg.qk_readout_iters, readout_l2=cfg.qk_readout_l2,
                        epochs=cfg.qk_epochs, lr=cfg.qk_lr, batch_size=cfg.batch_size,
                        weight_decay=cfg.weight_decay, patience=cfg.patience,
                        train_from=cfg.qk_train_from, seed=cfg.seed, chunk=cfg.eval_batch_size,
                        task=check_task(cfg.task))
    out = train_qk_fast_impl(model, train.x, train.y, val.x, val.y, fast, on_epoch, check_cancel)
    return TrainResult(history=out.history, best_epoch=out.best_epoch, best_val_loss=out.best_val_loss,
                       best_val_acc=out.best_val_acc, wall_s=out.wall_s, structure_s=out.structure_s,
                       solver="fast", readout_s=out.readout_s)


QK_SOLVERS = {"fast": train_qk_fast, "adam": train_qk_adam}


def train_qk(model: DecoupledModel, train: Split, val: Split, cfg: TrainConfig,
             on_epoch: EpochCallback | None = None,
             should_cancel: CancelCheck | None = None) -> TrainResult:
    """The QK-only retrain used by the retrain job; ``cfg.qk_solver`` picks the solver.

    The selector is only read; the estimator's weights are updated in place; the result's
    ``wall_s`` includes the structure computation.
    """
    try:
        solver = QK_SOLVERS[cfg.qk_solver]
    except KeyError:
        raise ValueError(f"unknown qk_solver {cfg.qk_solver!r}; choose from {sorted(QK_SOLVERS)}") from None
    return solver(model, train, val, cfg, on_epoch, should_cancel)


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
