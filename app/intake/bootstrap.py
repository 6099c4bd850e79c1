"""Version 1 from a data set or a data file: what ``skqk init`` and ``skqk serve`` on an empty
store do.

The rows go into the samples table first (in chunks, each with an idempotency key derived from
the source and the chunk's content), so later retrains train on old + new data and the holdout
rule of :mod:`app.core.splits` applies to them as well: version 1 is trained on the training
rows only and scored on the same holdout every later candidate is gated on. For a user's file,
the input normalisation (per-feature mean/std), the regression output scale and the feature
ranges are learnt from the training rows and stored with the version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.core.data import Split
from app.core.network import DecoupledModel, ReLUNet
from app.core.spec import ArchSpec, resolve_arch
from app.core.splits import split_masks
from app.core.tasks import evaluate_task, holdout_metrics
from app.core.training import EpochCallback, TrainConfig, train_full
from app.intake.file_ingest import chunk_key
from app.intake.training_table import ColumnTypes, TrainingTable, table_from_dataset, table_from_file
from app.serving.models import register_model
from app.settings import Settings
from app.storage import Store

log = logging.getLogger("skqk.bootstrap")

INIT_CHUNK_ROWS = 50_000


class BootstrapError(ValueError):
    """The data cannot make a version 1 (too few rows for the holdout, …); says what to change."""


@dataclass
class BootstrapResult:
    version: int
    metrics: dict[str, Any]
    seconds: float


def settings_table(settings: Settings, dataset: str | None = None, seed: int = 0,
                   synthetic_n: int = 20_000) -> TrainingTable:
    """What to bootstrap from: ``dataset`` if given, else SKQK_BOOTSTRAP_DATA, else the built-in."""
    if dataset is None and settings.bootstrap_data is not None:
        if not settings.bootstrap_label_column:
            raise BootstrapError("SKQK_BOOTSTRAP_DATA needs SKQK_BOOTSTRAP_LABEL_COLUMN (the label column)")
        labels = [c.strip() for c in settings.bootstrap_label_column.split(",") if c.strip()]

        def names(text: str | None) -> tuple[str, ...]:
            return tuple(c.strip() for c in (text or "").split(",") if c.strip())

        types = ColumnTypes(names(settings.bootstrap_categorical), names(settings.bootstrap_numeric),
                            names(settings.bootstrap_drop))
        return table_from_file(settings.bootstrap_data, labels, task=settings.bootstrap_task, types=types)
    return table_from_dataset(dataset or settings.bootstrap_dataset, seed=seed, synthetic_n=synthetic_n)


def bootstrap_version(store: Store, settings: Settings, dataset: str | None = None,
                      arch: str | None = None, cfg: TrainConfig | None = None,
                      on_epoch: EpochCallback | None = None, activate: bool = True,
                      synthetic_n: int = 20_000, table: TrainingTable | None = None) -> BootstrapResult:
    """Store the rows, train a plain ReLU net on them, register (and activate) it.

    ``table`` (a user's file) wins over ``dataset``; with neither, the settings decide.
    """
    cfg = cfg or TrainConfig(epochs=settings.bootstrap_epochs, batch_size=settings.retrain_batch_size,
                             lr=settings.retrain_lr, patience=settings.retrain_patience,
                             seed=settings.retrain_seed, device=settings.device)
    table = table or settings_table(settings, dataset, cfg.seed, synthetic_n)
    return bootstrap_table(store, settings, table, arch or settings.bootstrap_arch, cfg, on_epoch, activate)


def bootstrap_table(store: Store, settings: Settings, table: TrainingTable, arch: str, cfg: TrainConfig,
                    on_epoch: EpochCallback | None = None, activate: bool = True) -> BootstrapResult:
    started = time.perf_counter()
    cfg.task = table.task
    schema = table.schema
    batch_ids = store_table(store, table)
    rows = store.load_samples(schema.input_dim, batch_id=batch_ids,
                              n_targets=schema.num_outputs if schema.is_regression else None)
    masks = split_masks(rows.ids, settings.holdout_modulo)
    _check_split_sizes(len(rows), masks, settings)
    x, y = torch.from_numpy(rows.x), torch.from_numpy(rows.y)
    train, val, holdout = (Split(x[m], y[m]) for m in (masks.train, masks.val, masks.holdout))

    log.info("bootstrap: %d rows stored (%d training, %d validation, %d holdout); training %s for up to "
             "%d epochs", len(rows), len(train), len(val), len(holdout), arch, cfg.epochs)
    spec = _spec_for(table, arch, train)
    if table.normalize:  # learnt ranges go with learnt normalisation: a user's file
        schema = schema.with_ranges_from(train.x.numpy())
    schema = schema.with_reference_from(train.x.numpy())  # /explain's default reference
    net = ReLUNet(spec, seed=cfg.seed)
    result = train_full(net, train, val, cfg, on_epoch=on_epoch)
    device = next(net.parameters()).device
    held = holdout.to(device)
    scores = holdout_metrics(evaluate_task(lambda xb, _rows: net(xb), held.x, held.y, table.task,
                                           net.to_layer_space), table.task)
    model = DecoupledModel.from_net(net.cpu())
    metrics = {"dataset": table.source, "arch": spec.name, "task": table.task, **scores,
               "n_samples": len(rows), "n_train": len(train), "n_val": len(val), "n_holdout": len(holdout),
               "mode": "full", **result.summary()}
    version = register_model(store, model, mode="full", parent=None, metrics=metrics,
                             data_watermark=int(rows.ids.max()), schema=schema)
    if activate:
        store.activate(version, actor="bootstrap", reason=f"bootstrap on {table.source} ({arch})")
    seconds = time.perf_counter() - started
    log.info("bootstrap: version %d on %s, %s (%.1fs)", version, table.source, scores, seconds)
    return BootstrapResult(version, {**metrics, "bootstrap_seconds": seconds}, seconds)


def store_table(store: Store, table: TrainingTable, chunk_rows: int = INIT_CHUNK_ROWS) -> list[int]:
    """Store the rows in chunks; a chunk already stored (same source and content) is not repeated."""
    batch_ids = []
    for start in range(0, table.x.shape[0], chunk_rows):
        x, y = table.x[start:start + chunk_rows], table.y[start:start + chunk_rows]
        raw = table.raw[start:start + chunk_rows] if table.raw is not None else None
        key = chunk_key(f"bootstrap:{table.source}", start + 1, x, y, raw)
        if table.task == "regression":
            res = store.ingest(x, idempotency_key=key, targets=y, raw=raw)
        else:
            res = store.ingest(x, y, idempotency_key=key, raw=raw)
        batch_ids.append(res.batch_id)
    return batch_ids


def _check_split_sizes(n: int, masks: Any, settings: Settings) -> None:
    n_hold, n_val, n_train = int(masks.holdout.sum()), int(masks.val.sum()), int(masks.train.sum())
    if n_hold < settings.min_holdout or n_val == 0 or n_train == 0:
        raise BootstrapError(
            f"{n} rows are too few: the stable split gives {n_train} training, {n_val} validation and "
            f"{n_hold} holdout rows, and the promotion gate needs at least SKQK_MIN_HOLDOUT="
            f"{settings.min_holdout} holdout rows (about 1 row in "
            f"SKQK_HOLDOUT_MODULO={settings.holdout_modulo} is holdout). Use a larger file, or lower "
            "SKQK_MIN_HOLDOUT / SKQK_HOLDOUT_MODULO.")


def _spec_for(table: TrainingTable, arch: str, train: Split) -> ArchSpec:
    """The architecture for this data, with the learnt input normalisation / output scale."""
    schema = table.schema
    spec = resolve_arch(arch, schema.input_dim, schema.num_outputs)
    norm = _mean_std(train.x.numpy()) if table.normalize else None
    out = _mean_std(train.y.numpy().reshape(len(train), -1)) if schema.is_regression else None
    return spec.with_affines(norm, out) if norm or out else spec


def _mean_std(a: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-column mean and std in float64; a constant column gets std 1 (nothing to scale)."""
    mean = a.astype(np.float64).mean(axis=0)
    std = a.astype(np.float64).std(axis=0)
    std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
    return mean.tolist(), std.tolist()


def epoch_logger(epochs: int, say: Callable[[str], None] | None = None) -> EpochCallback:
    """One line per training epoch (``skqk serve`` on an empty store: progress, not silence)."""
    say = say or log.info

    def on_epoch(m: dict[str, Any]) -> None:
        score = (f"val_acc={m['val_acc']:.4f}" if "val_acc" in m else
                 f"val_rmse={m.get('val_rmse', float('nan')):.4g}")
        say(f"bootstrap epoch {m['epoch']}/{epochs}: train_loss={m['train_loss']:.4f} "
            f"val_loss={m['val_loss']:.4f} {score} ({m.get('seconds', 0.0):.1f}s)")

    return on_epoch


def ensure_bootstrapped(store: Store, settings: Settings, on_epoch: EpochCallback | None = None,
                        wait_s: float = 900.0, log_fn: Callable[[str], None] | None = None
                        ) -> int:
    """The active version; bootstraps one first when the store has none.

    Single-flight across processes (a ``bootstrap`` lease in SQL): a second replica
    starting at the same time waits for the first one's version instead of training too.
    Progress goes to ``log_fn`` (default: this module's logger): what is stored, one line per
    epoch (unless ``on_epoch`` is given), and the holdout score of version 1 at the end.
    """
    say = log_fn or log.info
    active = store.active_version()
    if active is not None:
        return active
    holder = f"bootstrap-{time.time_ns()}"
    deadline = time.monotonic() + wait_s
    waiting = False
    while True:
        if store.try_acquire_lease("bootstrap", holder, ttl_s=wait_s):
            try:
                active = store.active_version()
                if active is not None:
                    return active
                source = settings.bootstrap_data or settings.bootstrap_dataset
                say(f"empty store: bootstrapping version 1 on {source} "
                    f"({settings.bootstrap_arch}, up to {settings.bootstrap_epochs} epochs)")
                result = bootstrap_version(store, settings,
                                           on_epoch=on_epoch or epoch_logger(settings.bootstrap_epochs, say))
                scores = ", ".join(f"{k}={result.metrics[k]:.4f}" for k in
                                   ("holdout_acc", "holdout_rmse", "holdout_r2") if k in result.metrics)
                say(f"bootstrap done: version {result.version} active, {scores}, "
                    f"{result.metrics.get('epochs_run')} epochs in {result.seconds:.1f}s")
                return result.version
            finally:
                store.release_lease("bootstrap", holder)
        active = store.active_version()
        if active is not None:
            return active
        if not waiting:
            say("another process is bootstrapping version 1: waiting for it")
            waiting = True
        if time.monotonic() > deadline:
            raise TimeoutError("waited too long for another process to bootstrap the store")
        time.sleep(0.5)
