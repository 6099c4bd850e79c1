"""One retrain job, as a plain function: the embedded runner and a Celery task both call it.

``run_retrain_job(store, settings, job_id, mode)``:

1. marks the job ``running`` in the SQL job row and snapshots the data watermark
   (largest sample id) and the active version (the champion);
2. loads every sample up to the watermark with the champion's feature count and splits it
   by the stable id rule of :mod:`app.serving.splits` (holdout never trained on); measures
   the structural drift of the samples added since the selector was trained
   (:func:`app.core.drift.structural_drift`: does ``mode=full`` look needed?);
3. ``qk``: trains only the estimator under the champion's frozen selector
   (``app.core.training.train_qk``, structure cached once); ``full``: warm-starts a plain
   ReLU net from the selector and trains every weight; it becomes selector and estimator;
4. evaluates candidate and champion on the same holdout rows, registers the candidate
   (always, with its metrics), and promotes it by compare-and-set on the champion's version
   only if its holdout accuracy trails the champion's by no more than
   ``settings.promotion_tolerance``;
5. writes progress (phase, epoch, losses, val acc) and finally the result into the job row.

The function never touches HTTP or Redis; the caller refreshes serving replicas afterwards.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from app.core.data import Split
from app.core.device import pick_device
from app.core.drift import structural_drift
from app.core.network import DecoupledModel, Estimator, PathSelector
from app.core.training import TrainConfig, TrainingCancelled, evaluate, train_full, train_qk
from app.serving.models import load_model, register_model
from app.serving.splits import split_masks
from app.settings import Settings
from app.storage import Store, VersionRecord
from app.storage.store import utcnow

log = logging.getLogger("skqk.retrain")

MODES = ("qk", "full")
CandidateHook = Callable[[DecoupledModel], None]
ProgressHook = Callable[[dict[str, Any]], None]


class RetrainError(RuntimeError):
    """The job cannot run (no active model, too little data, …); the job row says why."""


def train_config(settings: Settings) -> TrainConfig:
    return TrainConfig(epochs=settings.retrain_epochs, batch_size=settings.retrain_batch_size,
                       lr=settings.retrain_lr, patience=settings.retrain_patience,
                       seed=settings.retrain_seed, device=settings.device)


def holdout_eval(model: DecoupledModel, holdout: Split, device: torch.device) -> tuple[float, float]:
    model.to(device).eval()
    data = holdout.to(device)
    return evaluate(lambda x, _rows: model(x), data)


def corrupt_estimator(scale: float = -1.0, noise: float = 5.0, seed: int = 0) -> CandidateHook:
    """A hook that makes a candidate worse on purpose (tests of the promotion gate)."""

    def hook(model: DecoupledModel) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.estimator.parameters():
                p.mul_(scale).add_(torch.randn(p.shape, generator=gen).to(p.device) * noise)

    return hook


def selector_origin(store: Store, record: VersionRecord) -> VersionRecord:
    """The version whose full training produced this version's selector (its structure)."""
    while record.mode != "full" and record.parent is not None:
        parent = store.get_version(record.parent, weights=False)
        if parent is None:
            break
        record = parent
    return record


def selector_drift(store: Store, champion_record: VersionRecord, champion: DecoupledModel,
                   ids: np.ndarray, x: torch.Tensor) -> dict[str, Any] | None:
    """Structural drift of the samples added since the selector was trained (None if none)."""
    origin = selector_origin(store, champion_record)
    watermark = origin.data_watermark
    if watermark is None:
        return None
    old, new = ids <= watermark, ids > watermark
    if old.sum() < 2 or new.sum() < 1:
        return None
    report = structural_drift(champion.selector, x[torch.from_numpy(old)], x[torch.from_numpy(new)])
    return {**report.to_dict(), "selector_version": origin.version, "selector_watermark": watermark}


def run_retrain_job(store: Store, settings: Settings, job_id: str, mode: str, *,
                    should_cancel: Callable[[], bool] | None = None,
                    corrupt_candidate: CandidateHook | None = None,
                    on_progress: ProgressHook | None = None,
                    fence: Callable[[], bool] | None = None,
                    actor: str | None = None) -> dict[str, Any]:
    """Run one retrain job to completion; returns (and stores) its result dict.

    Raises on failure after marking the job ``failed`` with the error message.
    ``corrupt_candidate`` is applied to the trained candidate before evaluation. ``fence``
    is asked right before promotion (a Celery worker: "do I still hold the retrain lock?");
    False registers the candidate but does not promote it.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    started = time.perf_counter()
    progress: dict[str, Any] = {"phase": "loading"}

    def report(**values: Any) -> None:
        progress.update(values)
        store.update_job(job_id, progress=dict(progress))
        if on_progress is not None:
            on_progress(dict(progress))

    store.update_job(job_id, status="running", started_at=utcnow(), progress=progress)
    try:
        result = _run(store, settings, job_id, mode, should_cancel, corrupt_candidate, report,
                      actor or f"retrain:{job_id}", started, fence)
    except TrainingCancelled as exc:
        store.update_job(job_id, status="failed", finished_at=utcnow(), error=f"cancelled: {exc}",
                         progress={**progress, "phase": "cancelled"})
        raise
    except Exception as exc:
        log.exception("retrain job %s failed", job_id)
        store.update_job(job_id, status="failed", finished_at=utcnow(),
                         error=f"{type(exc).__name__}: {exc}", progress={**progress, "phase": "failed"})
        raise
    store.update_job(job_id, status="succeeded", finished_at=utcnow(), result=result,
                     progress={**progress, "phase": "done"})
    return result


def _run(store: Store, settings: Settings, job_id: str, mode: str,
         should_cancel: Callable[[], bool] | None, corrupt_candidate: CandidateHook | None,
         report: Callable[..., None], actor: str, started: float,
         fence: Callable[[], bool] | None = None) -> dict[str, Any]:
    champion_version = store.active_version()
    if champion_version is None:
        raise RetrainError("no active model version to retrain from")
    watermark = store.max_sample_id()
    champion, champion_record = load_model(store, champion_version)
    spec = champion.spec
    rows = store.load_samples(spec.input_dim, max_id=watermark)
    keep = (rows.y >= 0) & (rows.y < spec.num_outputs)
    ids, x, y = rows.ids[keep], torch.from_numpy(rows.x[keep]), torch.from_numpy(rows.y[keep])
    masks = split_masks(ids, settings.holdout_modulo)
    train = Split(x[masks.train], y[masks.train])
    val = Split(x[masks.val], y[masks.val])
    holdout = Split(x[masks.holdout], y[masks.holdout])
    sizes = {"n_samples": len(ids), "n_train": len(train), "n_val": len(val), "n_holdout": len(holdout)}
    if len(holdout) < settings.min_holdout or len(train) == 0 or len(val) == 0:
        raise RetrainError(f"not enough samples to retrain: {sizes} (min_holdout={settings.min_holdout})")
    drift = selector_drift(store, champion_record, champion, ids, x)
    cfg = train_config(settings)
    report(phase="training", drift=drift, champion_version=champion_version, data_watermark=watermark,
           epochs=cfg.epochs, **sizes)

    def on_epoch(m: dict[str, Any]) -> None:
        report(epoch=m["epoch"], train_loss=m["train_loss"], val_loss=m["val_loss"],
               val_acc=m["val_acc"])

    device = pick_device(settings.device)
    t_train = time.perf_counter()
    if mode == "qk":
        candidate = DecoupledModel(PathSelector(champion.selector.net),
                                   Estimator(copy.deepcopy(champion.estimator.net)))
        train_result = train_qk(candidate, train, val, cfg, on_epoch, should_cancel)
    else:
        net = copy.deepcopy(champion.selector.net)  # warm start from the structure's owner
        net.requires_grad_(True)
        train_result = train_full(net, train, val, cfg, on_epoch, should_cancel, track_stability=False)
        candidate = DecoupledModel.from_net(net.cpu())
    train_s = time.perf_counter() - t_train
    candidate.cpu()
    if corrupt_candidate is not None:
        corrupt_candidate(candidate)

    report(phase="evaluating")
    t_eval = time.perf_counter()
    cand_loss, cand_acc = holdout_eval(candidate, holdout, device)
    champ_loss, champ_acc = holdout_eval(champion, holdout, device)
    eval_s = time.perf_counter() - t_eval
    candidate.cpu()

    gate_ok = cand_acc >= champ_acc - settings.promotion_tolerance
    metrics = {"holdout_acc": cand_acc, "holdout_loss": cand_loss, "champion_version": champion_version,
               "champion_holdout_acc": champ_acc, "champion_holdout_loss": champ_loss,
               "mode": mode, **sizes, **train_result.summary(), "drift": drift}
    report(phase="registering")
    version = register_model(store, candidate, mode=mode, parent=champion_version, metrics=metrics,
                             data_watermark=watermark, job_id=job_id)
    promoted = False
    if gate_ok and fence is not None and not fence():
        reason = "not promoted: this job lost the retrain lock (another job owns it now)"
    elif gate_ok:
        promoted = store.compare_and_set_active(
            version, champion_version, actor=actor,
            reason=f"{mode} retrain: holdout acc {cand_acc:.4f} vs champion {champ_acc:.4f}")
        reason = ("promoted: candidate within tolerance of champion" if promoted else
                  "not promoted: the active version changed while training (stale champion)")
    else:
        reason = (f"rejected by the gate: holdout acc {cand_acc:.4f} < champion {champ_acc:.4f} "
                  f"- tolerance {settings.promotion_tolerance}")
    total_s = time.perf_counter() - started
    log.info("retrain %s (%s): v%d %s", job_id, mode, version, reason)
    return {"candidate_version": version, "champion_version": champion_version, "promoted": promoted,
            "reason": reason, "mode": mode,
            "candidate": {"holdout_acc": cand_acc, "holdout_loss": cand_loss},
            "champion": {"holdout_acc": champ_acc, "holdout_loss": champ_loss},
            "tolerance": settings.promotion_tolerance, "data_watermark": watermark, **sizes,
            "epochs_run": train_result.summary()["epochs_run"], "drift": drift,
            "timings": {"train_s": train_s, "structure_s": train_result.structure_s,
                        "eval_s": eval_s, "total_s": total_s}}
