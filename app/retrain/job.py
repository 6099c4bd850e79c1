"""One retrain job, as a plain function: the embedded runner and a Celery task both call it.

``run_retrain_job(store, settings, job_id, mode)``, ``mode`` one of ``auto`` | ``qk`` | ``refresh`` |
``full``:

1. marks the job ``running`` in the SQL job row and snapshots the data watermark
   (largest sample id) and the active version (the champion);
2. streams the samples up to the watermark (inside the ``SKQK_RETENTION`` window) with the
   champion's feature count from the store in chunks (:mod:`app.retrain.sample_stream`;
   ``qk``/``auto``: through the feature cache, :mod:`app.retrain.cached_features`, which runs
   the network only on blocks of ids it lacks), splits them by the stable id rule of
   :mod:`app.core.splits` (holdout never trained on), and measures the structural drift of
   the samples added since the selector was trained on rows fetched by id
   (:func:`app.core.drift.structural_drift_rows`: does ``mode=full`` look needed?);
3. ``auto`` becomes ``full`` when the new data rivals the old, ``refresh`` when the inputs
   shifted with little new data, ``qk`` otherwise (:func:`app.retrain.refresh_step.choose_mode`);
   the result's ``mode`` says which ran and ``mode_reason`` why;
4. ``qk``: refits only the estimator's readout under the champion's frozen selector, a convex
   problem over the cached features passed chunk by chunk (:mod:`app.retrain.qk_refit`);
   ``full``: warm-starts a plain ReLU net from the selector and trains every weight (in memory
   while the rows fit ``SKQK_RETRAIN_MEMORY_MB``, else mini-batches streamed from the store);
   it becomes selector and estimator; ``refresh``: re-learns only the drifted layers for a small
   budget, then refits the readout on the new frozen structure (:mod:`app.retrain.refresh_step`);
5. evaluates candidate and champion on the same holdout rows, registers the candidate
   (always, with its metrics), and promotes it by compare-and-set on the champion's version
   only if its holdout accuracy trails the champion's by no more than
   ``settings.promotion_tolerance`` (regression: its holdout RMSE is at most the champion's
   × (1 + tolerance)); a candidate with a non-finite metric is never promoted;
6. writes progress (:mod:`app.retrain.solver_progress`: the solver's real phases) and
   finally the result into the job row.

Whether there is anything new to learn is the caller's question (``app.retrain.plan``,
asked by ``POST /retrain`` and ``skqk retrain`` before a job exists); a job that runs always
trains. The function never touches HTTP or Redis; the caller refreshes serving replicas
afterwards.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.device import pick_device
from app.core.drift import DriftThresholds, structural_drift_rows
from app.core.features import FeatureSchema
from app.core.network import DecoupledModel, Estimator, PathSelector
from app.core.stream_metrics import StreamMetrics
from app.core.stream_training import train_full_streamed
from app.core.tasks import holdout_metrics
from app.core.training import TrainConfig, TrainingCancelled, TrainResult, train_full
from app.retrain.cached_features import CachedFeatures, FeaturePass
from app.retrain.feature_cache import feature_key
from app.retrain.holdout_snapshot import HoldoutRows, check_evaluated, window_ids_with_holdout
from app.retrain.qk_refit import budget_weights, refit_readout, refit_summary
from app.retrain.refresh_step import choose_mode, run_refresh
from app.retrain.sample_stream import HOLDOUT, TRAIN, VAL, DataWindow, block_rows, retention_floor
from app.retrain.solver_progress import full_epoch_reporter
from app.retrain.streamed_data import StoreBatches, evaluate_streamed, fetch_rows, load_role
from app.serving.models import load_model, register_model, schema_of
from app.settings import Settings
from app.storage import Store, VersionRecord

log = logging.getLogger("skqk.retrain")

MODES = ("qk", "refresh", "full")  # what a retrain trains
REQUEST_MODES = ("auto", *MODES)  # what a caller may ask for; auto: the drift rule picks
STRUCTURAL_MODES = ("full", "import", "refresh")  # versions whose selector is their own
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
    while record.mode not in STRUCTURAL_MODES and record.parent is not None:
        parent = store.get_version(record.parent, weights=False)
        if parent is None:
            break
        record = parent
    return record


def selector_drift(store: Store, champion_record: VersionRecord, champion: DecoupledModel,
                   ids: np.ndarray, window: DataWindow, min_new: int | None = None) -> dict[str, Any] | None:
    """Structural drift of the samples added since the selector was trained (None if none).

    ``ids``: the window's ids in order; only the rows drift samples are fetched from the store.
    """
    origin = selector_origin(store, champion_record)
    watermark = origin.data_watermark
    if watermark is None:
        return None
    old_ids, new_ids = ids[ids <= watermark], ids[ids > watermark]
    if len(old_ids) < 2 or len(new_ids) < 1:
        return None
    thresholds = DriftThresholds() if min_new is None else DriftThresholds(min_new_samples=min_new)
    report = structural_drift_rows(champion.selector, len(old_ids), len(new_ids),
                                   lambda rows: fetch_rows(store, window, old_ids[rows.numpy()]),
                                   lambda rows: fetch_rows(store, window, new_ids[rows.numpy()]),
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
                    actor: str | None = None,
                    feature_pass: Callable[[int], FeaturePass] | None = None) -> dict[str, Any]:
    """Run one retrain job to completion; returns (and stores) its result dict.

    Starts by a compare-and-set queued → running (:class:`JobNotQueued` if that fails: a
    duplicate delivery or a cancelled job trains nothing). Ends ``succeeded``, ``cancelled``
    (a cancel was requested in the job row — ``Store.request_cancel``, read between epochs
    whoever runs the job — or ``should_cancel`` returned True: :class:`TrainingCancelled` is
    re-raised) or ``failed`` (re-raised after the row says why; :class:`JobInterrupted` from
    the hook fails it too).
    ``corrupt_candidate`` is applied to the trained candidate before evaluation. ``fence``
    is asked right before promotion (a Celery worker: "do I still own this job?"); False
    registers the candidate but does not promote it. ``feature_pass(version)`` computes the
    QK feature blocks another way (sharded across Celery workers, app.retrain.sharded_features).
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
                      actor or f"retrain:{job_id}", started, fence, feature_pass)
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


def _evaluate_cached(features: CachedFeatures, models: list[DecoupledModel],
                     task: str) -> tuple[list[dict[str, float]], int]:
    """Holdout metrics of models that share the cached features (readout-only siblings), and
    the number of rows they were scored on."""
    meters = [StreamMetrics(task, m.estimator.net.to_layer_space) for m in models]
    with torch.no_grad():
        for phi, y in features.role_chunks(HOLDOUT):
            for model, meter in zip(models, meters, strict=True):
                net = model.estimator.net
                meter.add(net.finish_output(net.readout(phi)), y)
    return [holdout_metrics(meter.result(), task) for meter in meters], meters[0].n


def _fits_in_memory(n_rows: int, window: DataWindow, budget_bytes: int) -> bool:
    """A full retrain trains in memory (as it always did) when its rows fit half the budget."""
    row_bytes = 4 * (window.n_features + (window.n_targets or 2))
    return 3 * n_rows * row_bytes <= budget_bytes // 2


def _run(store: Store, settings: Settings, job_id: str, mode: str,
         should_cancel: Callable[[], bool] | None, corrupt_candidate: CandidateHook | None,
         report: Callable[..., None], actor: str, started: float,
         fence: Callable[[], bool] | None = None,
         feature_pass: Callable[[int], FeaturePass] | None = None) -> dict[str, Any]:
    champion_version = store.active_version()
    if champion_version is None:
        raise RetrainError("no active model version to retrain from")
    watermark = store.max_sample_id()
    champion, champion_record = load_model(store, champion_version)
    spec = champion.spec
    schema = schema_of(champion_record, spec)
    task = schema.task
    n_targets = spec.num_outputs if schema.is_regression else None
    floor = retention_floor(store, settings, spec.input_dim, watermark, n_targets)
    window = DataWindow(spec.input_dim, n_targets, spec.num_outputs, watermark, floor,
                        settings.holdout_modulo)
    phi_dim = champion.estimator.net.readout.in_features
    block_ids = block_rows(settings, spec.input_dim, phi_dim)
    budget = settings.retrain_memory_mb << 20
    device = pick_device(settings.device)

    def check_cancel() -> None:
        if should_cancel is not None and should_cancel():
            raise TrainingCancelled("cancelled during the feature pass")

    with ExitStack() as cleanup:
        features: CachedFeatures | None = None
        holdout_rows: HoldoutRows | None = None  # full: the holdout copied when the ids are fixed

        def scratch(prefix: str) -> Path:
            return Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))

        if mode in ("qk", "auto"):  # the ids come with the cached features
            root = (settings.resolved_feature_cache_dir if settings.feature_cache
                    else scratch("skqk-features-"))
            sharded = feature_pass(champion_version) if feature_pass is not None else None
            features = prepare_features(store, settings, champion, window, root, block_ids, report,
                                        check_cancel, sharded)
            ids = features.ids()
        else:
            holdout_rows = HoldoutRows(scratch("skqk-holdout-"), window)
            ids = window_ids_with_holdout(store, window, block_ids, holdout_rows)
        roles = window.roles(ids)
        sizes = {"n_samples": len(ids), "n_train": int((roles == TRAIN).sum()),
                 "n_val": int((roles == VAL).sum()), "n_holdout": int((roles == HOLDOUT).sum())}
        if sizes["n_holdout"] < settings.min_holdout or sizes["n_train"] == 0 or sizes["n_val"] == 0:
            raise RetrainError(f"not enough samples to retrain: {sizes} (min_holdout={settings.min_holdout})")
        drift = selector_drift(store, champion_record, champion, ids, window, settings.retrain_drift_min_new)
        requested = mode
        if mode == "auto":
            mode, mode_reason = choose_mode(drift, refresh_fits=_fits_in_memory(len(ids), window, budget))
        else:
            mode_reason = f"requested: mode={mode}"
        seen = champion_record.data_watermark  # what the champion was trained on
        new_samples = len(ids) if seen is None else int((ids > seen).sum())
        cfg = train_config(settings, task)
        report(phase="training", mode=mode, mode_reason=mode_reason, drift=drift,
               champion_version=champion_version, data_watermark=watermark, new_samples=new_samples,
               retention_floor=floor, **sizes)
        log.info("retrain %s: mode %s (%s)", job_id, mode, mode_reason)

        t_train = time.perf_counter()
        refit: dict[str, Any] | None = None  # qk: exact or sampled (app/retrain/qk_refit.py)
        refresh_info = None
        if mode == "refresh":
            candidate, train_result, refresh_info = run_refresh(store, settings, window, block_ids, ids,
                                                                champion, drift, cfg, report, should_cancel)
            streamed = False
        elif mode == "qk":
            assert features is not None
            candidate = DecoupledModel(PathSelector(champion.selector.net),
                                       Estimator(copy.deepcopy(champion.estimator.net)))
            rows = sizes["n_train"] + sizes["n_val"]
            report(phase="features", rows_done=rows, rows_total=rows)
            report(phase="refit", rows_done=rows, rows_total=rows, refit_max_iterations=cfg.qk_readout_iters)

            def on_refit(m: dict[str, Any]) -> None:
                report(phase="refit", refit_iterations=m.get("readout_iterations"),
                       refit_best_iteration=m.get("readout_best_iteration"), refit_kept=m.get("kept"),
                       **{k: m[k] for k in ("train_loss", "val_loss", "val_acc") if k in m})

            weights = budget_weights(ids, roles, seen, settings.retrain_refit_max_rows)
            refit = refit_summary(weights, roles, settings.retrain_refit_max_rows)
            report(phase="refit", refit=refit["kind"])
            train_result = refit_readout(candidate, features, cfg, weights, on_refit, should_cancel)
            train_result.structure_s = features.stats.seconds
            streamed = features.streamed
        else:
            report(epochs=cfg.epochs)
            net = copy.deepcopy(champion.selector.net)  # warm start from the structure's owner
            net.requires_grad_(True)
            on_epoch = full_epoch_reporter(report, cfg.epochs)
            streamed = not _fits_in_memory(len(ids), window, budget)
            if not streamed:
                train = load_role(store, window, TRAIN, block_ids)
                val = load_role(store, window, VAL, block_ids)
                train_result = train_full(net, train, val, cfg, on_epoch, should_cancel,
                                          track_stability=False)
                del train, val
            else:  # an IterableDataset over the store, validation streamed each epoch
                batches = StoreBatches(store, window, TRAIN, block_ids, cfg.batch_size, cfg.seed)

                def val_eval() -> dict[str, float]:
                    return evaluate_streamed(store, window, VAL, [(net, net.to_layer_space)], task,
                                             block_ids, device)[0]

                train_result = train_full_streamed(net, batches, val_eval, cfg, on_epoch, should_cancel)
            candidate = DecoupledModel.from_net(net.cpu())
        train_s = time.perf_counter() - t_train
        candidate.cpu()
        if corrupt_candidate is not None:
            corrupt_candidate(candidate)

        report(phase="evaluating")
        t_eval = time.perf_counter()
        if features is not None and mode == "qk" and feature_key(candidate) == features.key:
            (cand, champ), n_evaluated = _evaluate_cached(features, [candidate, champion], task)
        else:  # the candidate has hidden weights of its own: run both on the holdout rows
            pair = [candidate.to(device).eval(), champion.to(device).eval()]
            forwards = [(m, m.estimator.net.to_layer_space) for m in pair]
            if holdout_rows is None:  # qk with new hidden weights: read the rows now, count them
                holdout_rows = HoldoutRows(scratch("skqk-holdout-"), window)
                window_ids_with_holdout(store, window, block_ids, holdout_rows)
            raw, n_evaluated = holdout_rows.evaluate(forwards, task, device)
            cand, champ = (holdout_metrics(r, task) for r in raw)
        check_evaluated(n_evaluated, sizes["n_holdout"])  # else fail: never gate on another holdout
        eval_s = time.perf_counter() - t_eval
        candidate.cpu()
        cache_stats = asdict(features.stats) if features is not None else None

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
            "retention_floor": floor, "new_samples": new_samples, **sizes, **_solver_summary(train_result),
            "drift": drift, "refresh": refresh_info, "feature_cache": cache_stats, "streamed": streamed,
            "refit": refit, "torch_threads": torch.get_num_threads(),  # floats depend on it
            "timings": {"train_s": train_s, "structure_s": train_result.structure_s,
                        "eval_s": eval_s, "total_s": total_s}}


def prepare_features(store: Store, settings: Settings, champion: DecoupledModel, window: DataWindow,
                     root: Path, block_ids: int, report: Callable[..., None],
                     check_cancel: Callable[[], None],
                     feature_pass: FeaturePass | None = None) -> CachedFeatures:
    """Bring the champion's feature cache up to the watermark, reporting the rows computed."""
    last = [0.0]

    def on_rows(done: int, total: int) -> None:
        if time.monotonic() - last[0] >= 0.5 or done >= total:  # one job-row write per interval
            last[0] = time.monotonic()
            report(phase="features", rows_computed=done, rows_to_compute=total)

    report(phase="features", rows_computed=0)
    features = CachedFeatures.prepare(store, champion, window, root, block_ids, settings.feature_cache_keep,
                                      settings.retrain_memory_mb << 20, on_rows, check_cancel, feature_pass)
    report(rows_computed=features.stats.rows_computed, rows_cached_blocks=features.stats.blocks_reused)
    return features
