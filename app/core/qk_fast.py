"""Fast QK-only retrain: the estimator learns under the selector's frozen structure.

What a frozen structure lets a retrain skip, and what this solver does with it:

1. **Readout as a convex problem.** With the structure fixed and the hidden layers held, the
   logits are ``Φ Wᵀ + b`` for the gated penultimate features Φ of the current estimator: a
   multinomial logistic regression. It is solved full-batch, warm-started from the current
   readout, by a preconditioned L-BFGS (:func:`app.core.qk_readout.fit_logistic`), and
   early-stopped along its own path on the validation split (the iterate with the lowest
   validation loss is kept, the warm start included; 5 iterations without improvement end
   it) — the analogue of epoch-wise early stopping, at the cost of a tiny product per step.
   Building Φ takes one chunked pass over the data: while the estimator's hidden layers
   still equal the selector's (after step 2, and after every readout-only retrain), Φ is
   the selector's own penultimate activation; otherwise the selector gives the gates and the
   estimator runs gated. The structure is never materialised for this stage.
2. **Optional gradient epochs** (``epochs > 0``) on the layers from ``train_from`` up, after
   the readout: the structure of the training and validation sets is computed once and kept
   unpacked on the device (multiplicative masks in the compute dtype while they fit
   ``cache_budget_bytes``, else bool masks and packed pool choices), and the gated output of
   the frozen layers below ``train_from`` is cached, so each epoch only runs the trainable
   slice. Adam with a small learning rate (a freshly refit readout sits in a sharp minimum
   that Adam's first steps at 1e-3 throw away), early stopping on the validation loss with
   the best weights restored.

Measured (bench/retrain.py → docs/BENCHMARKS.md, docs/EXPERIMENTS.md): stage 1 alone matches
or beats a full warm-started retrain when the new data is a modest share of the old and
resembles it, in a small fraction of its time; when the new data is as large as the old or
shifted, the frozen structure is the limit and no QK solver tried here closes the gap —
:mod:`app.core.drift` flags those cases.

The forward used for training, validation and serving is always the gated estimator: the
trained weights are written into ``model.estimator`` in place; the selector is only read.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from app.core.network import DecoupledModel, ReLUNet
from app.core.qk_readout import fit_logistic, fit_ridge_select
from app.core.spec import ACTIVATION_TYPES, StructureLayout
from app.core.structure import PackedStructure, pack, unpack

EpochCallback = Callable[[dict[str, Any]], None]
CancelCheck = Callable[[int], None]  # raises to cancel; gets the upcoming epoch number


@dataclass
class QKFastConfig:
    readout_iters: int = 20  # L-BFGS iterations of the convex readout refit (0: skip it)
    readout_l2: float = 1e-4  # L2 on the readout weights, on the mean-loss scale
    readout_val_stop: bool = True  # return the solver iterate with the lowest validation loss
    epochs: int = 0  # gradient epochs after the readout (0: readout only)
    lr: float = 1e-4  # Adam learning rate of those epochs
    batch_size: int = 128
    weight_decay: float = 0.0
    patience: int = 5
    train_from: int | str = "all"  # "all", a spec layer index, or -k for the last k param layers
    seed: int = 0
    cache_budget_bytes: int = 1 << 30  # dense masks per split up to this size, else bool
    chunk: int = 4096  # samples per selector/estimator pass while building caches
    task: str = "classification"  # regression: MSE in layer units, ridge readout (penalty on val)


@dataclass
class QKFastResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0  # 0: nothing beat the starting estimator; 1: the readout refit; 2+: epochs
    best_val_loss: float = float("inf")
    best_val_acc: float = 0.0
    start_val_loss: float = float("inf")
    structure_s: float = 0.0  # selector passes (and, with epochs, the cache of the frozen prefix)
    readout_s: float = 0.0
    wall_s: float = 0.0
    readout_iterations: int = 0
    train_from: int = 0


# ---- running a slice of the gated estimator ------------------------------------------------


def param_layers(net: ReLUNet) -> list[int]:
    return [i for i, layer in enumerate(net.spec.layers) if layer["type"] in ("linear", "conv")]


def _offsets(net: ReLUNet, start: int) -> tuple[int, int]:
    gates = sum(1 for layer in net.spec.layers[:start] if layer["type"] in ACTIVATION_TYPES)
    pools = sum(1 for layer in net.spec.layers[:start] if layer["type"] == "maxpool")
    return gates, pools


def resolve_train_from(net: ReLUNet, train_from: int | str) -> int:
    layers = param_layers(net)
    if train_from in ("all", "auto"):
        return layers[0] if net.spec.is_sequential else 0  # a DAG is only cut at its input
    start = int(train_from)
    if start < 0:  # -k: the last k parameter layers
        start = layers[max(len(layers) + start, 0)]
    if start not in layers:
        raise ValueError(f"train_from={train_from!r} is not a linear/conv layer index; use 'all', "
                         f"-k or one of {layers}")
    if not net.spec.is_sequential and any(j < start - 1 for ins in net.inputs[start:] for j in ins):
        raise ValueError(f"train_from={train_from!r}: a skip connection crosses layer {start}; use 'all'")
    return start


def run_layers(net: ReLUNet, h: torch.Tensor, gates: list[torch.Tensor], pools: list[torch.Tensor],
               start: int, stop: int) -> torch.Tensor:
    """Gated forward of ``net.spec.layers[start:stop]``; ``gates``/``pools`` are that slice's."""
    return net.run_layers(h, start, stop, gates, pools)


# ---- caches of what stays fixed -----------------------------------------------------------


@dataclass
class CachedSplit:
    """One split with everything that stays fixed while the layers from ``start`` train."""

    inputs: torch.Tensor  # gated output of the frozen prefix (the reshaped input if none)
    gates: list[torch.Tensor]  # masks of the ReLUs at or above ``start``
    pools: list[torch.Tensor] | PackedStructure  # their max-pool indices (or packed choices)
    pool_layout: StructureLayout
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        if isinstance(self.pools, PackedStructure):
            pools = unpack(self.pools.index(idx), self.pool_layout).pool_indices
        else:
            pools = [p[idx] for p in self.pools]
        return self.inputs[idx], [g[idx] for g in self.gates], pools


def _pool_layout(net: ReLUNet, pool_offset: int) -> StructureLayout:
    full = StructureLayout.of(net.spec)
    return StructureLayout([], full.pool_in_shapes[pool_offset:], full.pool_out_shapes[pool_offset:],
                           full.pool_windows[pool_offset:])


@torch.no_grad()
def cache_split(model: DecoupledModel, x: torch.Tensor, y: torch.Tensor, start: int,
                budget_bytes: int = 1 << 30, chunk: int = 4096) -> CachedSplit:
    """Run the selector once (structure) and the frozen estimator prefix once (its output)."""
    net = model.estimator.net
    dtype = next(net.parameters()).dtype
    g_off, p_off = _offsets(net, start)
    layout = _pool_layout(net, p_off)
    inputs, gate_parts, pool_parts = [], [], []
    for i in range(0, x.shape[0], chunk):
        s = model.selector.structure(x[i:i + chunk])
        h = net.prepare_input(x[i:i + chunk])
        inputs.append(run_layers(net, h, s.gates[:g_off], s.pool_indices[:p_off], 0, start))
        gate_parts.append(s.gates[g_off:])
        pool_parts.append(s.pool_indices[p_off:])
    n_gates, n_pools = len(gate_parts[0]), len(pool_parts[0])
    gates = [torch.cat([part[j] for part in gate_parts]) for j in range(n_gates)]
    pools: list[torch.Tensor] | PackedStructure = [
        torch.cat([part[j] for part in pool_parts]) for j in range(n_pools)]
    if sum(g.numel() for g in gates) * dtype.itemsize <= budget_bytes:
        gates = [g.to(dtype) for g in gates]  # ready-made masks: no conversion per batch
    if pools and sum(p.numel() for p in pools) * 8 > budget_bytes:  # int64 too big: 1 byte each
        from app.core.structure import Structure

        pools = pack(Structure([], pools), layout)
    return CachedSplit(torch.cat(inputs), gates, pools, layout, y)


def _plain_forward(net: ReLUNet, h: torch.Tensor, stop: int) -> torch.Tensor:
    """The ordinary ReLU forward of layers [0, stop) (input already reshaped)."""
    return net.plain_layers(h, stop)


@torch.no_grad()
def readout_features(model: DecoupledModel, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Gated penultimate features Φ of the estimator under the selector's structure, chunked.

    When the estimator's hidden layers still hold the selector's weights (right after step 2,
    and after every readout-only QK retrain) the gated estimator and the plain selector agree
    up to the readout, so Φ is the selector's own penultimate activation: one pass, not two.
    """
    net, sel = model.estimator.net, model.selector.net
    last = len(net.spec.layers) - 1
    shared = model.shares_hidden_layers()
    parts = []
    for i in range(0, x.shape[0], chunk):
        h = net.prepare_input(x[i:i + chunk])
        if shared:
            parts.append(_plain_forward(sel, h, last))
        else:
            s = model.selector.structure(x[i:i + chunk])
            parts.append(run_layers(net, h, s.gates, s.pool_indices, 0, last))
    return torch.cat(parts)


def _cached_features(net: ReLUNet, data: CachedSplit, start: int, batch: int = 8192) -> torch.Tensor:
    last = len(net.spec.layers) - 1
    parts = []
    with torch.no_grad():
        for i in range(0, len(data), batch):
            h, g, p = data.rows(torch.arange(i, min(i + batch, len(data)), device=data.y.device))
            parts.append(run_layers(net, h, g, p, start, last))
    return torch.cat(parts)


def _evaluate_cached(net: ReLUNet, data: CachedSplit, start: int, task: str, batch: int = 8192
                     ) -> tuple[float, float]:
    outs = []
    with torch.no_grad():
        for i in range(0, len(data), batch):
            idx = torch.arange(i, min(i + batch, len(data)), device=data.y.device)
            h, g, p = data.rows(idx)
            outs.append(run_layers(net, h, g, p, start, len(net.spec.layers)))
    return _loss_acc(torch.cat(outs), data.y, task)


def _loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Classification: cross-entropy; regression: MSE (y already in layer units)."""
    return F.cross_entropy(out, y) if task == "classification" else F.mse_loss(out, y)


def _loss_acc(out: torch.Tensor, y: torch.Tensor, task: str) -> tuple[float, float]:
    """(loss, accuracy); accuracy is NaN for regression."""
    if task == "classification":
        return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())
    return float(F.mse_loss(out, y)), float("nan")


# ---- the solver ----------------------------------------------------------------------------


def train_qk_fast(model: DecoupledModel, train_x: torch.Tensor, train_y: torch.Tensor,
                  val_x: torch.Tensor, val_y: torch.Tensor, cfg: QKFastConfig,
                  on_epoch: EpochCallback | None = None,
                  check_cancel: CancelCheck | None = None) -> QKFastResult:
    """Fast QK-only retrain (see the module doc). Tensors must be on the model's device.

    ``on_epoch`` gets one dict per stage step: ``{"epoch", "stage", "train_loss", "val_loss",
    "val_acc", "seconds"}`` (epoch 1 is the readout refit, 2+ the gradient epochs).
    ``check_cancel(epoch)`` may raise to abort between steps; the estimator is then left with
    the best weights seen so far.
    """
    started = time.perf_counter()
    net = model.estimator.net
    n_layers = len(net.spec.layers)
    readout = net.blocks[n_layers - 1]
    start = resolve_train_from(net, cfg.train_from)
    result = QKFastResult(train_from=start)
    use_epochs = cfg.epochs > 0
    task = cfg.task
    if task == "regression":  # the solver works in the last layer's (standardised) units
        train_y = net.to_layer_space(train_y.reshape(train_y.shape[0], -1).to(readout.weight.dtype))
        val_y = net.to_layer_space(val_y.reshape(val_y.shape[0], -1).to(readout.weight.dtype))

    # Stage 0: what stays fixed. With epochs to run, cache the structure and frozen prefix;
    # for the readout alone, one chunked pass per split straight to the features suffices.
    train = val = None
    if use_epochs:
        train = cache_split(model, train_x, train_y, start, cfg.cache_budget_bytes, cfg.chunk)
        val = cache_split(model, val_x, val_y, start, cfg.cache_budget_bytes, cfg.chunk)
        phi = _cached_features(net, train, start) if cfg.readout_iters > 0 else None
        phi_val = _cached_features(net, val, start)
    else:
        phi = readout_features(model, train_x, cfg.chunk) if cfg.readout_iters > 0 else None
        phi_val = readout_features(model, val_x, cfg.chunk)
    result.structure_s = time.perf_counter() - started
    # Rows whose features overflowed (outlier inputs far beyond the training data) cannot
    # inform a convex refit; leave them out of it rather than let inf/NaN poison the solver.
    if phi is not None:
        finite = torch.isfinite(phi).all(dim=1)
        if not bool(finite.all()):
            phi, train_y = phi[finite], train_y[finite]
    finite_val = torch.isfinite(phi_val).all(dim=1)
    if not bool(finite_val.all()):
        phi_val, val_y = phi_val[finite_val], val_y[finite_val]

    with torch.no_grad():
        best_loss, best_acc = _loss_acc(readout(phi_val), val_y, task)
    result.start_val_loss = best_loss
    best_state = copy.deepcopy(net.state_dict())
    best_epoch = 0

    # Stage 1: convex readout refit, warm-started; kept only if the holdout agrees.
    if cfg.readout_iters > 0 and phi is not None and len(phi) > 0:
        if check_cancel is not None:
            check_cancel(1)
        t0 = time.perf_counter()
        with torch.no_grad():
            if task == "regression":
                fit = fit_ridge_select(phi, train_y, phi_val, val_y)
            else:
                fit = fit_logistic(phi, train_y, readout.out_features, cfg.readout_l2,
                                   readout.weight, readout.bias, max_iter=cfg.readout_iters,
                                   val=(phi_val, val_y) if cfg.readout_val_stop else None)
            old_w, old_b = readout.weight.clone(), readout.bias.clone()
            readout.weight.copy_(fit.weight)
            readout.bias.copy_(fit.bias)
            val_loss, val_acc = _loss_acc(readout(phi_val), val_y, task)
            train_loss = (fit.objective if task == "regression" else
                          fit.objective - 0.5 * cfg.readout_l2 * float((fit.weight ** 2).sum()))
        if val_loss < best_loss:
            best_loss, best_acc, best_epoch = val_loss, val_acc, 1
            best_state = copy.deepcopy(net.state_dict())
        else:
            with torch.no_grad():
                readout.weight.copy_(old_w)
                readout.bias.copy_(old_b)
        result.readout_s = time.perf_counter() - t0
        result.readout_iterations = fit.iterations
        metrics = {"epoch": 1, "stage": "readout", "train_loss": train_loss, "val_loss": val_loss,
                   "val_acc": val_acc, "readout_iterations": fit.iterations,
                   "readout_best_iteration": fit.best_iteration, "kept": best_epoch == 1,
                   "seconds": result.readout_s}
        result.history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
    del phi, phi_val

    # Stage 2: optional gradient epochs on the trainable slice, on the cached structure.
    params = [p for li in range(start, n_layers) for p in net.blocks[li].parameters()]
    if use_epochs and params and train is not None and val is not None:
        generator = torch.Generator().manual_seed(cfg.seed)
        best = {"loss": best_loss, "acc": best_acc, "epoch": best_epoch, "state": best_state}
        try:
            _epochs(net, params, train, val, start, cfg, generator, result, on_epoch, check_cancel, best)
        finally:  # also on cancel: leave the best weights seen so far
            net.load_state_dict(best["state"])
        best_loss, best_acc, best_epoch = best["loss"], best["acc"], best["epoch"]
    result.best_epoch, result.best_val_loss, result.best_val_acc = best_epoch, best_loss, best_acc
    result.wall_s = time.perf_counter() - started
    return result


def _epochs(net: ReLUNet, params: list[torch.nn.Parameter], train: CachedSplit, val: CachedSplit,
            start: int, cfg: QKFastConfig, generator: torch.Generator, result: QKFastResult,
            on_epoch: EpochCallback | None, check_cancel: CancelCheck | None,
            best: dict[str, Any]) -> None:
    """Adam epochs with early stopping; updates ``best`` (loss, acc, epoch, state) in place."""
    n_layers = len(net.spec.layers)
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    stale = 0
    for epoch in range(2, cfg.epochs + 2):
        if check_cancel is not None:
            check_cancel(epoch)
        t0 = time.perf_counter()
        order = torch.randperm(len(train), generator=generator).to(train.y.device)
        loss_sum = 0.0
        for i in range(0, len(train), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            h, g, p = train.rows(idx)
            loss = _loss(run_layers(net, h, g, p, start, n_layers), train.y[idx], cfg.task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * idx.numel()
        val_loss, val_acc = _evaluate_cached(net, val, start, cfg.task)
        metrics = {"epoch": epoch, "stage": "epochs", "train_loss": loss_sum / len(train),
                   "val_loss": val_loss, "val_acc": val_acc, "seconds": time.perf_counter() - t0}
        result.history.append(metrics)
        if val_loss < best["loss"]:
            best.update(loss=val_loss, acc=val_acc, epoch=epoch, state=copy.deepcopy(net.state_dict()))
            stale = 0
        else:
            stale += 1
        if on_epoch is not None:
            on_epoch(metrics)
        if stale >= cfg.patience:
            break
