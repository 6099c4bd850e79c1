"""Version 1 from a bundled data set: what ``skqk init`` and ``skqk serve`` on an empty store do.

The data set's rows go into the samples table first (idempotency key
``bootstrap:<dataset>:seed<seed>``), so later retrains train on old + new data and the
holdout rule of :mod:`app.serving.splits` applies to them as well: version 1 is trained on
the training rows only and scored on the same holdout every later candidate is gated on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from app.core.data import Split, load_dataset
from app.core.network import DecoupledModel, ReLUNet
from app.core.spec import resolve_arch
from app.core.training import EpochCallback, TrainConfig, evaluate, train_full
from app.serving.models import register_model
from app.serving.splits import split_masks
from app.settings import Settings
from app.storage import Store

log = logging.getLogger("skqk.bootstrap")


@dataclass
class BootstrapResult:
    version: int
    metrics: dict[str, Any]
    seconds: float


def bootstrap_version(store: Store, settings: Settings, dataset: str | None = None,
                      arch: str | None = None, cfg: TrainConfig | None = None,
                      on_epoch: EpochCallback | None = None, activate: bool = True,
                      synthetic_n: int = 20_000) -> BootstrapResult:
    """Store the data set's rows, train a plain ReLU net on them, register (and activate) it."""
    started = time.perf_counter()
    dataset = dataset or settings.bootstrap_dataset
    arch = arch or settings.bootstrap_arch
    cfg = cfg or TrainConfig(epochs=settings.bootstrap_epochs, batch_size=settings.retrain_batch_size,
                             lr=settings.retrain_lr, patience=settings.retrain_patience,
                             seed=settings.retrain_seed, device=settings.device)
    data = load_dataset(dataset, seed=cfg.seed, synthetic_n=synthetic_n)
    everything = Split.concat([data.train, data.val, data.test])
    key = f"bootstrap:{dataset}:seed{cfg.seed}:n{len(everything)}"
    ingested = store.ingest(everything.x.numpy(), everything.y.numpy(), idempotency_key=key)
    rows = store.load_samples(data.input_dim, batch_id=ingested.batch_id)
    masks = split_masks(rows.ids, settings.holdout_modulo)
    x, y = torch.from_numpy(rows.x), torch.from_numpy(rows.y)
    train, val, holdout = (Split(x[m], y[m]) for m in (masks.train, masks.val, masks.holdout))

    spec = resolve_arch(arch, data.input_dim, data.num_classes)
    net = ReLUNet(spec, seed=cfg.seed)
    result = train_full(net, train, val, cfg, on_epoch=on_epoch)
    device = next(net.parameters()).device
    holdout_loss, holdout_acc = evaluate(lambda xb, _rows: net(xb), holdout.to(device))
    model = DecoupledModel.from_net(net.cpu())
    metrics = {"dataset": dataset, "arch": spec.name, "holdout_acc": holdout_acc,
               "holdout_loss": holdout_loss, "n_samples": len(rows), "n_train": len(train),
               "n_val": len(val), "n_holdout": len(holdout), "mode": "full", **result.summary()}
    version = register_model(store, model, mode="full", parent=None, metrics=metrics,
                             data_watermark=int(rows.ids.max()))
    if activate:
        store.activate(version, actor="bootstrap", reason=f"bootstrap on {dataset} ({arch})")
    seconds = time.perf_counter() - started
    log.info("bootstrap: version %d on %s, holdout acc %.4f (%.1fs)", version, dataset, holdout_acc, seconds)
    return BootstrapResult(version, {**metrics, "bootstrap_seconds": seconds}, seconds)


def ensure_bootstrapped(store: Store, settings: Settings, on_epoch: EpochCallback | None = None,
                        wait_s: float = 900.0, log_fn: Callable[[str], None] | None = None
                        ) -> int:
    """The active version; bootstraps one first when the store has none.

    Single-flight across processes (a ``bootstrap`` lease in SQL): a second replica
    starting at the same time waits for the first one's version instead of training too.
    """
    say = log_fn or log.info
    active = store.active_version()
    if active is not None:
        return active
    holder = f"bootstrap-{time.time_ns()}"
    deadline = time.monotonic() + wait_s
    while True:
        if store.try_acquire_lease("bootstrap", holder, ttl_s=wait_s):
            try:
                active = store.active_version()
                if active is not None:
                    return active
                say(f"empty store: bootstrapping version 1 on {settings.bootstrap_dataset} "
                    f"({settings.bootstrap_arch}, {settings.bootstrap_epochs} epochs)")
                return bootstrap_version(store, settings, on_epoch=on_epoch).version
            finally:
                store.release_lease("bootstrap", holder)
        active = store.active_version()
        if active is not None:
            return active
        if time.monotonic() > deadline:
            raise TimeoutError("waited too long for another process to bootstrap the store")
        time.sleep(0.5)
