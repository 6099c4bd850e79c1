"""One retrain job, as a plain function: the embedded runner and a Celery task both call it.

``run_retrain_job(store, settings, job_id, mode)``, ``mode`` one of ``auto`` | ``qk`` | ``full``:

1. marks the job ``running`` in the SQL job row and snapshots the data watermark
   (largest sample id) and the active version (the champion);
2. loads every sample up to the watermark with the champion's feature count and splits it
   by the stable id rule of :mod:`app.serving.splits` (holdout never trained on); measures
   the structural drift of the samples added since the selector was trained
   (:func:`app.core.drift.structural_drift`: does ``mode=full`` look needed?);
3. ``auto`` becomes ``full`` when that drift recommends it and ``qk`` otherwise (too few new
   samples to judge, none since the selector was trained, or nothing drifted); the result's
   ``mode`` says which ran and ``mode_reason`` why;
4. ``qk``: refits only the estimator under the champion's frozen selector
   (``app.core.training.train_qk``: a feature pass and a convex readout refit, no epochs);
   ``full``: warm-starts a plain ReLU net from the selector and trains every weight; it
   becomes selector and estimator;
5. evaluates candidate and champion on the same holdout rows, registers the candidate
   (always, with its metrics), and promotes it by compare-and-set on the champion's version
   only if its holdout accuracy trails the champion's by no more than
   ``settings.promotion_tolerance`` (regression: its holdout RMSE is at most the champion's
   × (1 + tolerance)); a candidate with a non-finite metric is never promoted;
6. writes progress (:mod:`app.serving.solver_progress`: the solver's real phases) and
   finally the result into the job row.

Whether there is anything new to learn is the caller's question (``app.serving.retrain_plan``,
asked by ``POST /retrain`` and ``skqk retrain`` before a job exists); a job that runs always
trains. The function never touches HTTP or Redis; the caller refreshes serving replicas
afterwards.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from app.core.data import Split
from app.core.device import pick_device
from app.core.drift import DriftThresholds, structural_drift
from app.core.features import FeatureSchema
from app.core.network import DecoupledModel, Estimator, PathSelector
from app.core.tasks import evaluate_task, holdout_metrics
from app.core.training import TrainConfig, TrainingCancelled, TrainResult, train_full, train_qk
from app.serving.models import load_model, register_model, schema_of
from app.serving.solver_progress import QKProgress, full_epoch_reporter
from app.serving.splits import split_masks
from app.settings import Settings
from app.storage import Store, VersionRecord

log = logging.getLogger("skqk.retrain")

MODES = ("qk", "full")  # what a retrain trains
REQUEST_MODES = ("auto", *MODES)  # what a caller may ask for; auto: the drift rule picks
CandidateHook = Callable[[DecoupledModel], None]
ProgressHook = Callable[[dict[str, Any]], None]


class RetrainError(RuntimeError):
    """The job cannot run (no active model, too little data, …); the job row says why."""


class JobNotQueued(RetrainError):
    """The job was not ``queued`` when this run tried to start it: another delivery runs it,
    or it was cancelled or failed meanwhile. Nothing was trained and the row is unchanged."""

    def __init__(self, job_id: str, status: str | None) -> None:
        super().__init__(f"retrain job {job_id} is {status or 'unknown'}, not queued: not started")
        self.job_id, self.status = job_id, status


class JobInterrupted(RuntimeError):
    """Raised by a ``should_cancel`` hook when the job must stop for another reason than a
    cancel request (its server is going away, its worker lost the job): it ends ``failed``."""


def train_config(settings: Settings, task: str = "classification") -> TrainConfig:
    return TrainConfig(epochs=settings.retrain_epochs, batch_size=settings.retrain_batch_size,
                       lr=settings.retrain_lr, patience=settings.retrain_patience,
                       seed=settings.retrain_seed, device=settings.device, task=task,
                       qk_readout_iters=settings.retrain_qk_readout_iters)


def choose_mode(drift: dict[str, Any] | None) -> tuple[str, str]:
    """``mode=auto``: (the mode to run, why), from the drift of the samples since the selector."""
    if drift is None:
        return "qk", ("auto: qk, no drift to measure (no new samples since the selector was "
                      "trained, or its version records no data watermark)")
    if drift.get("recommend_full"):
        return "full", f"auto: full, the drift rule recommends it ({drift['reason']})"
    return "qk", f"auto: qk ({drift['reason']})"


def holdout_eval(model: DecoupledModel, holdout: Split, device: torch.device,
                 task: str = "classification") -> dict[str, float]:
    """``holdout_*`` metrics of a model (accuracy/log loss, or RMSE/MAE/R²)."""
    model.to(device).eval()
    data = holdout.to(device)
    raw = evaluate_task(lambda x, _rows: model(x), data.x, data.y, task,
                        model.estimator.net.to_layer_space)
    return holdout_metrics(raw, task)


def gate_decision(task: str, candidate: dict[str, float], champion: dict[str, float],
                  tolerance: float) -> tuple[bool, str]:
    """(promote?, why): accuracy may trail by ``tolerance``; RMSE may grow by that fraction."""
    key = "holdout_acc" if task == "classification" else "holdout_rmse"
    cand, champ = candidate[key], champion[key]
    if not all(math.isfinite(float(v)) for v in candidate.values()):
        return False, f"rejected by the gate: the candidate's holdout metrics are not finite ({candidate})"
    if task == "classification":
        if cand >= champ - tolerance:
            return True, f"holdout acc {cand:.4f} vs champion {champ:.4f}"
        return False, (f"rejected by the gate: holdout acc {cand:.4f} < champion {champ:.4f} "
                       f"- tolerance {tolerance}")
    if not math.isfinite(champ) or cand <= champ * (1 + tolerance):
        return True, f"holdout rmse {cand:.6g} vs champion {champ:.6g}"
    return False, (f"rejected by the gate: holdout rmse {cand:.6g} > champion {champ:.6g} × "
                   f"(1 + tolerance {tolerance})")


def corrupt_estimator(scale: float = -1.0, noise: float = 5.0, seed: int = 0) -> CandidateHook:
    """A hook that makes a candidate worse on purpose (tests of the promotion gate)."""

    def hook(model: DecoupledModel) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.estimator.parameters():
                p.mul_(scale).add_(torch.randn(p.shape, generator=gen).to(p.device) * noise)

    return hook


def _schema_to_keep(record: VersionRecord, schema: FeatureSchema) -> FeatureSchema | None:
    """Candidates inherit the champion's schema (None stays None: an old store stays as it was)."""
    return schema if record.feature_schema else None


def selector_origin(store: Store, record: VersionRecord) -> VersionRecord:
    """The version whose full training produced this version's selector (its structure)."""
    while record.mode not in ("full", "import") and record.parent is not None:
        parent = store.get_version(record.parent, weights=False)
        if parent is None:
            break
        record = parent
    return record


def selector_drift(store: Store, champion_record: VersionRecord, champion: DecoupledModel,
                   ids: np.ndarray, x: torch.Tensor, min_new: int | None = None) -> dict[str, Any] | None:
    """Structural drift of the samples added since the selector was trained (None if none)."""
    origin = selector_origin(store, champion_record)
    watermark = origin.data_watermark
    if watermark is None:
        return None
    old, new = ids <= watermark, ids > watermark
    if old.sum() < 2 or new.sum() < 1:
        return None
    thresholds = DriftThresholds() if min_new is None else DriftThresholds(min_new_samples=min_new)
    report = structural_drift(champion.selector, x[torch.from_numpy(old)], x[torch.from_numpy(new)],
                              thresholds=thresholds)
    return {**report.to_dict(), "selector_version": origin.version, "selector_watermark": watermark}


def _solver_summary(result: TrainResult) -> dict[str, Any]:
    """What the solver did: gradient epochs (full; qk only with qk_epochs), the readout refit."""
    epochs = sum(1 for h in result.history if h.get("stage") != "readout")
    refit = next((h for h in result.history if h.get("stage") == "readout"), None)
    out: dict[str, Any] = {"solver": result.solver, "epochs_run": epochs}
    if refit is not None:
        out.update(refit_iterations=refit.get("readout_iterations"),
                   refit_best_iteration=refit.get("readout_best_iteration"))
    return out


def run_retrain_job(store: Store, settings: Settings, job_id: str, mode: str, *,
                    should_cancel: Callable[[], bool] | None = None,
                    corrupt_candidate: CandidateHook | None = None,
                    on_progress: ProgressHook | None = None,
                    fence: Callable[[], bool] | None = None,
                    actor: str | None = None) -> dict[str, Any]:
    """Run one retrain job to completion; returns (and stores) its result dict.

    Starts by a compare-and-set queued → running (:class:`JobNotQueued` if that fails: a
    duplicate delivery or a cancelled job trains nothing). Ends ``succeeded``, ``cancelled``
    (a cancel was requested in the job row — ``Store.request_cancel``, read between epochs
    whoever runs the job — or ``should_cancel`` returned True: :class:`TrainingCancelled` is
    re-raised) or ``failed`` (re-raised after the row says why; :class:`JobInterrupted` from
    the hook fails it too).
    ``corrupt_candidate`` is applied to the trained candidate before evaluation. ``fence``
    is asked right before promotion (a Celery worker: "do I still own this job?"); False
    registers the candidate but does not promote it.
    """
    if mode not in REQUEST_MODES:
        raise ValueError(f"mode must be one of {REQUEST_MODES}, got {mode!r}")
    started = time.perf_counter()
    job = store.start_job(job_id)
    if job is None:
        current = store.get_job(job_id)
        raise JobNotQueued(job_id, current.status if current else None)
    # keep what the runner recorded about the job's deliveries (published/republished)
    progress: dict[str, Any] = {**{k: v for k, v in job.progress.items() if k == "delivery"},
                                "phase": "loading"}

    def report(**values: Any) -> None:
        progress.update(values)
        store.update_job(job_id, progress=dict(progress))
        if on_progress is not None:
            on_progress(dict(progress))

    def cancel_check() -> bool:
        return (should_cancel is not None and should_cancel()) or store.cancel_requested(job_id)

    store.update_job(job_id, progress=progress)
    try:
        result = _run(store, settings, job_id, mode, cancel_check, corrupt_candidate, report,
                      actor or f"retrain:{job_id}", started, fence)
    except TrainingCancelled as exc:
        log.info("retrain job %s cancelled by request (%s)", job_id, exc)
        store.finish_job(job_id, "cancelled", error=f"cancelled by request ({exc})",
                         progress={**progress, "phase": "cancelled"})
        raise
    except JobInterrupted as exc:
        log.warning("retrain job %s interrupted: %s", job_id, exc)
        store.finish_job(job_id, "failed", error=f"interrupted: {exc}",
                         progress={**progress, "phase": "failed"})
        raise
    except Exception as exc:
        log.exception("retrain job %s failed", job_id)
        store.finish_job(job_id, "failed", error=f"{type(exc).__name__}: {exc}",
                         progress={**progress, "phase": "failed"})
        raise
    if not store.finish_job(job_id, "succeeded", result=result, progress={**progress, "phase": "done"}):
        log.warning("retrain job %s: its row was no longer running at the end (judged lost "
                    "meanwhile), so it is not marked succeeded", job_id)
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
    schema = schema_of(champion_record, spec)
    task = schema.task
    rows = store.load_samples(spec.input_dim, max_id=watermark,
                              n_targets=spec.num_outputs if schema.is_regression else None)
    keep = (np.isfinite(rows.y).all(axis=1) if schema.is_regression
            else (rows.y >= 0) & (rows.y < spec.num_outputs))
    ids, x, y = rows.ids[keep], torch.from_numpy(rows.x[keep]), torch.from_numpy(rows.y[keep])
    masks = split_masks(ids, settings.holdout_modulo)
    train = Split(x[masks.train], y[masks.train])
    val = Split(x[masks.val], y[masks.val])
    holdout = Split(x[masks.holdout], y[masks.holdout])
    sizes = {"n_samples": len(ids), "n_train": len(train), "n_val": len(val), "n_holdout": len(holdout)}
    if len(holdout) < settings.min_holdout or len(train) == 0 or len(val) == 0:
        raise RetrainError(f"not enough samples to retrain: {sizes} (min_holdout={settings.min_holdout})")
    drift = selector_drift(store, champion_record, champion, ids, x, settings.retrain_drift_min_new)
    requested = mode
    if mode == "auto":
        mode, mode_reason = choose_mode(drift)
    else:
        mode_reason = f"requested: mode={mode}"
    seen = champion_record.data_watermark  # what the champion was trained on
    new_samples = len(ids) if seen is None else int((ids > seen).sum())
    cfg = train_config(settings, task)
    report(phase="training", mode=mode, mode_reason=mode_reason, drift=drift,
           champion_version=champion_version, data_watermark=watermark, new_samples=new_samples, **sizes)
    log.info("retrain %s: mode %s (%s)", job_id, mode, mode_reason)

    device = pick_device(settings.device)
    t_train = time.perf_counter()
    if mode == "qk":
        candidate = DecoupledModel(PathSelector(champion.selector.net),
                                   Estimator(copy.deepcopy(champion.estimator.net)))
        if cfg.qk_solver == "fast":  # a feature pass and a readout refit: its own phases
            with QKProgress(report, candidate.selector.net, len(train) + len(val), cfg.qk_readout_iters,
                            cfg.qk_epochs) as progress:
                train_result = train_qk(candidate, train, val, cfg, progress.on_epoch, should_cancel)
        else:
            train_result = train_qk(candidate, train, val, cfg, full_epoch_reporter(report, cfg.epochs),
                                    should_cancel)
    else:
        report(epochs=cfg.epochs)
        net = copy.deepcopy(champion.selector.net)  # warm start from the structure's owner
        net.requires_grad_(True)
        train_result = train_full(net, train, val, cfg, full_epoch_reporter(report, cfg.epochs),
                                  should_cancel, track_stability=False)
        candidate = DecoupledModel.from_net(net.cpu())
    train_s = time.perf_counter() - t_train
    candidate.cpu()
    if corrupt_candidate is not None:
        corrupt_candidate(candidate)

    report(phase="evaluating")
    t_eval = time.perf_counter()
    cand = holdout_eval(candidate, holdout, device, task)
    champ = holdout_eval(champion, holdout, device, task)
    eval_s = time.perf_counter() - t_eval
    candidate.cpu()

    gate_ok, verdict = gate_decision(task, cand, champ, settings.promotion_tolerance)
    metrics = {**cand, "champion_version": champion_version,
               **{f"champion_{k}": v for k, v in champ.items()},
               "mode": mode, "mode_reason": mode_reason, **sizes, **train_result.summary(), "drift": drift}
    report(phase="registering")
    version = register_model(store, candidate, mode=mode, parent=champion_version, metrics=metrics,
                             data_watermark=watermark, job_id=job_id,
                             schema=_schema_to_keep(champion_record, schema))
    promoted = False
    if gate_ok and fence is not None and not fence():
        reason = "not promoted: this job lost the retrain lock (another job owns it now)"
    elif gate_ok:
        promoted = store.compare_and_set_active(version, champion_version, actor=actor,
                                                reason=f"{mode} retrain: {verdict}")
        reason = ("promoted: candidate within tolerance of champion" if promoted else
                  "not promoted: the active version changed while training (stale champion)")
    else:
        reason = verdict
    total_s = time.perf_counter() - started
    log.info("retrain %s (%s): v%d %s", job_id, mode, version, reason)
    return {"candidate_version": version, "champion_version": champion_version, "promoted": promoted,
            "reason": reason, "mode": mode, "mode_requested": requested, "mode_reason": mode_reason,
            "task": task, "candidate": cand, "champion": champ,
            "tolerance": settings.promotion_tolerance, "data_watermark": watermark,
            "new_samples": new_samples, **sizes, **_solver_summary(train_result), "drift": drift,
            "timings": {"train_s": train_s, "structure_s": train_result.structure_s,
                        "eval_s": eval_s, "total_s": total_s}}
