"""`skqk` command line."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from app.experiments.cli import experiment_app
from app.samples_cli import samples_app

if TYPE_CHECKING:
    from app.settings import Settings
    from app.storage import Store

cli = typer.Typer(help="skqk-serve: serve ReLU nets as selector+estimator; cheap QK retrains.",
                  no_args_is_help=True, add_completion=False)
cli.add_typer(experiment_app, name="experiment")
cli.add_typer(samples_app, name="samples")
# Not a terminal (a pipe, a log file, CI): no wrapping at 80 columns, which would split paths
# and JSON; rich still drops colour codes there.
console = Console(soft_wrap=not sys.stdout.isatty())


@cli.callback()
def _root() -> None:
    """skqk-serve command line."""


def epoch_progress(total: int) -> tuple[Progress, object]:
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), console=console, transient=False)
    task = progress.add_task("training", total=total, info="")
    return progress, task


def _store():
    from app.settings import get_settings
    from app.storage import open_store

    settings = get_settings()
    return settings, open_store(settings.resolved_database_url)


@cli.command()
def init(dataset: str = typer.Option("digits", help="built-in data set: digits | mnist5k | synthetic"),
         data: Path | None = typer.Option(None, "--data", help="your own CSV, Parquet or NPZ (x, y) file",
                                          exists=True, dir_okay=False),
         label_column: str | None = typer.Option(
             None, "--label-column", help="label column (regression: comma-separated target columns)"),
         features: str | None = typer.Option(None, "--features", help="feature columns a,b,c (default: all "
                                                                      "other columns, in file order)"),
         task: str = typer.Option("classification", help="classification | regression"),
         classes: str | None = typer.Option(None, help="class names in index order (default: the label "
                                                       "values, sorted; integer labels stay integers)"),
         normalize: str = typer.Option("standard", help="--data: standard (per-feature mean/std, part of "
                                                        "the model) | none"),
         arch: str = typer.Option("mlp:256-256", help="mlp:W-W-…, lenet5, vgg-small or JSON spec"),
         epochs: int = typer.Option(30, min=1), batch_size: int = typer.Option(128, min=1),
         lr: float = typer.Option(1e-3), seed: int = typer.Option(0),
         device: str = typer.Option("auto", help="auto | cpu | cuda"),
         force: bool = typer.Option(False, help="register (and activate) another version when the "
                                                "store already has some"),
         if_empty: bool = typer.Option(False, "--if-empty",
                                       help="do nothing (exit 0) when the store already has a version")
         ) -> None:
    """Train step 1 (a plain ReLU net) on a data set or your file and register it as version 1.

    The rows are stored as samples too (the "old data" later retrains use).
    """
    from app.core.training import TrainConfig
    from app.serving.bootstrap import bootstrap_table

    if normalize not in ("standard", "none"):
        _fail("--normalize must be standard or none", 2)
    if data is None and (label_column or features or classes or task != "classification"):
        _fail("--label-column, --features, --classes and --task go with --data FILE", 2)
    if data is not None and not label_column:
        _fail("--data needs --label-column (the column holding the labels)", 2)
    settings, store = _store()
    existing = store.latest_version()
    if existing is not None and if_empty:
        console.print(f"store already has versions (latest {existing}, active {store.active_version()}); "
                      "nothing to do")
        store.dispose()
        return
    if existing is not None and not force:
        _fail(f"the store ({_safe_url(store.url)}) already has versions (latest {existing}, "
              f"active {store.active_version()}); pass --force to register another one")
    table = _init_table(dataset, data, label_column, features, task, classes, normalize == "standard", seed)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, task=table.task)
    progress, bar = epoch_progress(epochs)
    started = time.perf_counter()
    with progress:
        def on_epoch(m: dict) -> None:
            score = (f"val_acc={m['val_acc']:.3f}" if "val_acc" in m else f"val_rmse={m['val_rmse']:.4g}")
            # gates_changed: the share of ReLU on/off gates (training rows × hidden units) that flipped
            # since the previous epoch; near 0 the structure has settled (docs/OPERATIONS.md)
            progress.update(bar, completed=m["epoch"],
                            info=f"{score} gates_changed={100 * m.get('gate_flip', 0):.2f}%")
        try:
            result = bootstrap_table(store, settings, table, arch, cfg, on_epoch, activate=True)
        except ValueError as exc:  # too few rows, a spec that does not fit the data, …
            _fail(str(exc), 2)
    elapsed = time.perf_counter() - started
    metrics = {**result.metrics, "init_seconds": elapsed}
    score = (f"holdout_acc={metrics['holdout_acc']:.4f}" if "holdout_acc" in metrics else
             f"holdout_rmse={metrics['holdout_rmse']:.4g} holdout_r2={metrics['holdout_r2']:.4f}")
    console.print(f"version {result.version} (active): {score} "
                  f"({elapsed:.1f}s, {metrics['epochs_run']} epochs) → {_safe_url(store.url)}")
    console.print_json(finite_json(metrics))
    store.dispose()


def finite_json(values: dict) -> str:
    """JSON for the summary line: a non-finite number (regression has no accuracy: NaN) is null,
    so the line parses as JSON (``json.dumps`` would write ``NaN``, which is not JSON)."""
    def clean(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(values), allow_nan=False)


def _init_table(dataset: str, data: Path | None, label_column: str | None, features: str | None,
                task: str, classes: str | None, normalize: bool, seed: int):  # -> TrainingTable
    from app.core.features import SchemaError
    from app.serving.training_table import table_from_dataset, table_from_file

    if data is None:
        return table_from_dataset(dataset, seed=seed)
    try:
        from app.datafiles import DataFileError
    except ImportError as exc:  # pyarrow missing: the files extra
        _fail(f"reading data files needs the 'files' extra: pip install 'skqk-serve[files]' ({exc})", 2)
    try:
        return table_from_file(data, _names(label_column), _names(features) if features else None, task,
                               _names(classes) if classes else None, normalize)
    except (DataFileError, SchemaError) as exc:
        _fail(f"{data}: {exc}", 2)


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


# Exit codes of the commands that take data (init, ingest, import, export), docs/OPERATIONS.md:
# 2 the command line, the file or its data is refused (nothing of it stored; ingest: the chunks
# committed before a bad row stay, and a re-run skips them); 1 the store's state or a failure
# stops it (init on a store with versions and no --force, ingest with no active version, the
# store unreachable); 130 interrupted.
EXIT_STATE, EXIT_REFUSED = 1, 2


def _fail(message: str, code: int = EXIT_STATE):  # -> NoReturn
    console.print(f"[red]{message}", highlight=False)
    raise typer.Exit(code)


@cli.command()
def ingest(file: Path = typer.Argument(..., exists=True, dir_okay=False, help="CSV, Parquet or NPZ (x, y)"),
           label_column: str | None = typer.Option(
               None, "--label-column", help="label column(s) (default: the one the model was trained with)"),
           start_row: int = typer.Option(1, min=1, help="first data row to import (1 = the row after the "
                                                        "header); to resume after fixing a bad row"),
           chunk_rows: int = typer.Option(50_000, min=1, help="rows per committed chunk (keep it the same "
                                                              "when re-running)")) -> None:
    """Stream a data file into the store in chunks, exactly once.

    Columns are matched to the active version's schema by name (NPZ: by position). Each chunk
    is stored when it commits; running the same command again after a crash or Ctrl-C skips
    the chunks already stored. A bad row stops the import with its row number and column.
    """
    from app.serving.file_ingest import FileIngestError, ingest_file
    from app.serving.version_schema import schema_of

    settings, store = _store()
    active = store.active_version()
    if active is None:
        store.dispose()
        _fail("the store has no active model version: run `skqk init` (or `skqk serve`) first", EXIT_STATE)
    record = store.get_version(active, weights=False)
    assert record is not None
    schema = schema_of(record)
    progress = _ingest_progress()
    bar = progress.add_task("ingest", total=None, rows=0, rate=0.0)

    def on_chunk(p) -> None:  # IngestProgress, after each committed chunk
        if not progress.live.is_started:  # drawn from the first commit on: a refusal draws no bar
            progress.start()
        total, done = ((p.total_rows, p.rows_read) if p.total_rows is not None else
                       (file.stat().st_size, p.bytes_read or 0))
        progress.update(bar, total=total, completed=done, rows=p.rows_read, rate=p.rows_per_s)

    try:
        report = ingest_file(store, schema, file, _names(label_column) or None, chunk_rows, start_row,
                             check_ranges=settings.input_range != "off", on_chunk=on_chunk)
        if progress.live.is_started:  # the final figures, the same as the summary's
            progress.update(bar, completed=progress.tasks[0].total, rows=report.rows_read,
                            rate=report.rows_per_s)
    except FileIngestError as exc:
        progress.stop()
        _fail(str(exc), EXIT_REFUSED)
    except ImportError as exc:
        _fail(f"reading data files needs the 'files' extra: pip install 'skqk-serve[files]' ({exc})",
              EXIT_REFUSED)
    except KeyboardInterrupt:
        progress.stop()
        _fail("interrupted: every chunk committed so far is stored; run the same command again to "
              "continue (stored chunks are skipped)", 130)
    finally:
        progress.stop()
        store.dispose()
    console.print(f"{report.rows_stored} rows stored, {report.rows_skipped} already stored (skipped), "
                  f"{report.chunks} chunks, {report.rows_per_s:,.0f} rows/s; store total "
                  f"{report.total_samples} samples (version {active}'s schema)")


@cli.command("import")
def import_(model: Path = typer.Argument(..., exists=True, dir_okay=False,
                                        help="MODEL.onnx, MODEL.pt2 (torch.export.save) or "
                                             "MODEL.safetensors"),
            data: Path | None = typer.Option(None, "--data", exists=True, dir_okay=False,
                                             help="the data the model was trained on (stored as "
                                                  "old samples)"),
            label_column: str | None = typer.Option(None, "--label-column", help="label column(s) of --data"),
            features: str | None = typer.Option(None, "--features", help="feature columns of --data, in the "
                                                                         "network's input order"),
            task: str = typer.Option("classification", help="classification | regression"),
            classes: str | None = typer.Option(None, help="class names in output order"),
            input_shape: str | None = typer.Option(None, "--input-shape", help="C,H,W (or D) when the file "
                                                                                "leaves it open"),
            activate: bool = typer.Option(False, help="make it the active version (automatic on an empty "
                                                      "store)")) -> None:
    """Register a network trained elsewhere; selector and estimator both start as its weights.

    Checked against the source model (onnxruntime / the exported program) before anything is
    stored; unsupported ops are refused by name.
    """
    from app.core.features import SchemaError
    from app.importers import UnsupportedModel
    from app.importers.torch_warnings import torch_deprecations_once
    from app.serving.importing import ImportMismatch, import_model

    shape = tuple(int(v) for v in _names(input_shape)) if input_shape else None
    settings, store = _store()
    try:
        with torch_deprecations_once():  # torch's internal deprecations: once, not per call
            result = import_model(store, settings, model, data, _names(label_column) or None,
                                  _names(features) if features else None, task,
                                  _names(classes) if classes else None, shape, activate)
    except (UnsupportedModel, ImportMismatch, SchemaError) as exc:
        _fail(f"{model}: {exc}", 2)
    except ImportError as exc:  # onnx / onnxruntime / pyarrow not installed
        _fail(f"{exc}: pip install 'skqk-serve[import,files]'", 2)
    except ValueError as exc:  # a data file problem (DataFileError) or a bad option
        _fail(f"{exc}", 2)
    finally:
        store.dispose()
    state = "active" if result.activated else f"not active (POST /models/{result.version}/activate)"
    console.print(f"version {result.version} ({state}): imported {model.name}, max |diff| vs source "
                  f"{result.max_abs_diff:.3g}, {result.n_samples_stored} samples stored")
    for note in result.notes:
        console.print(f"  {note}")
    console.print_json(finite_json(result.metrics))


@cli.command()
def export(version: int = typer.Argument(..., help="model version"),
           format: str = typer.Option("onnx", "--format", help="onnx"),
           output: Path = typer.Option(..., "-o", "--output", help="file to write")) -> None:
    """Write a served version (selector gates → estimator outputs) as one ONNX graph."""
    from app.serving.models import load_model, schema_of
    from app.storage import UnknownVersion

    if format != "onnx":
        _fail("--format: only onnx is supported", 2)
    try:
        from app.importers.onnx_export import export_onnx
    except ImportError as exc:
        _fail(f"{exc}: pip install 'skqk-serve[import]'", 2)
    _settings, store = _store()
    try:
        model, record = load_model(store, version)
    except UnknownVersion as exc:
        _fail(str(exc), 2)
    finally:
        store.dispose()
    schema = schema_of(record, model.spec)
    try:
        export_onnx(model, output, output_name="predictions" if schema.is_regression else "logits")
    except ImportError as exc:
        _fail(f"{exc}: pip install 'skqk-serve[import]'", 2)
    console.print(f"version {version} → {output} (input [N, {', '.join(map(str, model.spec.input_shape))}])")


def _ingest_progress() -> Progress:
    from rich.progress import TimeRemainingColumn

    # each time says what it is; the rate is IngestProgress.rows_per_s, as in the summary line
    return Progress(TextColumn("[bold]ingest"), BarColumn(), TextColumn("{task.fields[rows]:,} rows"),
                    TextColumn("{task.fields[rate]:,.0f} rows/s"), TextColumn("elapsed"), TimeElapsedColumn(),
                    TextColumn("left"), TimeRemainingColumn(), console=console, transient=False)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@cli.command()
def serve(host: str | None = typer.Option(None, help="bind address (SKQK_HOST, default 127.0.0.1)"),
          port: int | None = typer.Option(None, help="port (SKQK_PORT, default 8000)"),
          workers: int | None = typer.Option(None, min=1, help="uvicorn worker processes (SKQK_WORKERS)"),
          data_dir: Path | None = typer.Option(None, help="SKQK_DATA_DIR"),
          log_level: str | None = typer.Option(None, help="SKQK_LOG_LEVEL")) -> None:
    """Serve the HTTP API; bootstraps version 1 (SKQK_BOOTSTRAP_DATASET, digits) on an empty store."""
    import logging
    import os

    import uvicorn

    from app.api.http_protocol import protocol_path
    from app.serving.bootstrap import ensure_bootstrapped
    from app.serving.multiproc_metrics import prepare_workers
    from app.settings import get_settings, resolve_api_key

    for name, value in (("HOST", host), ("PORT", port), ("WORKERS", workers), ("DATA_DIR", data_dir),
                        ("LOG_LEVEL", log_level)):
        if value is not None:  # via the environment, so every worker process sees them
            os.environ[f"SKQK_{name}"] = str(value)
    get_settings.cache_clear()
    settings, store = _store()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key_source = "SKQK_API_KEY" if settings.api_key else str(settings.api_key_file.resolve())
    resolve_api_key(settings)
    active = ensure_bootstrapped(store, settings)  # logs what it stores, each epoch, the score
    console.print(f"store {_safe_url(store.url)}: active version {active}; admin key from {key_source}")
    store.dispose()
    # several workers: one /metrics scrape covers them all (app/serving/multiproc_metrics.py)
    own_metrics_dir = prepare_workers(settings.workers)
    try:
        uvicorn.run("app.api.main:create_app", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_level=settings.log_level.lower(),
                    access_log=settings.access_log, timeout_graceful_shutdown=5,
                    http=protocol_path())  # uvicorn's protocol + SKQK_HEADER_TIMEOUT_S
    finally:
        if own_metrics_dir:
            import shutil

            shutil.rmtree(own_metrics_dir, ignore_errors=True)


# `skqk retrain` exit codes, for cron and CI (docs/OPERATIONS.md)
EXIT_PROMOTED, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED, EXIT_NOTHING_NEW = 0, 1, 2, 3, 4


@cli.command()
def retrain(mode: str = typer.Option("auto", help="auto (the drift rule picks qk or full) | qk (estimator "
                                                  "only, structure frozen) | full"),
            force: bool = typer.Option(False, "--force", help="retrain even when no sample lies beyond the "
                                                              "active version's data watermark"),
            epochs: int | None = typer.Option(None, min=1, help="in-process: override SKQK_RETRAIN_EPOCHS "
                                                                "(full retrains)"),
            tolerance: float | None = typer.Option(None, min=0.0,
                                                   help="in-process: override SKQK_PROMOTION_TOLERANCE"),
            url: str | None = typer.Option(None, "--url", help="submit to a running service (e.g. "
                                           "http://skqk:8000) instead of running here"),
            api_key: str | None = typer.Option(None, "--api-key", help="--url: the admin key (default "
                                               "SKQK_API_KEY / SKQK_API_KEY_FILE)"),
            wait: bool = typer.Option(True, "--wait/--no-wait", help="--url: poll the job until it ends "
                                      "(default); --no-wait exits 0 once queued"),
            timeout: float = typer.Option(7200.0, min=1.0, help="--url --wait: give up (exit 1) after "
                                          "this many seconds"),
            poll: float = typer.Option(2.0, min=0.1, help="--url --wait: seconds between status reads")
            ) -> None:
    """One retrain; exits 0 promoted, 3 not promoted (the gate), 4 nothing new to train on, 1 failed.

    Without --url it runs here, in this process (same job as POST /retrain: the same
    single-flight lease, and the Redis lock in distributed mode; running servers pick up a
    promotion on their next poll, or at once over Redis). With --url it asks that service to run
    it (its runner: embedded, or a Celery worker) and, with --wait, polls until it ends.
    Nothing new since the active version's data watermark: nothing is done (exit 4) unless --force.
    """
    from app.serving.retrain_job import REQUEST_MODES

    if mode not in REQUEST_MODES:
        _fail(f"--mode must be one of {list(REQUEST_MODES)}", EXIT_USAGE)
    if url is not None:
        if epochs is not None or tolerance is not None:
            _fail("--epochs and --tolerance apply to an in-process retrain; a service uses its own "
                  "SKQK_* settings", EXIT_USAGE)
        raise typer.Exit(_retrain_remote(url, api_key, mode, force, wait, timeout, poll))
    raise typer.Exit(_retrain_here(mode, force, epochs, tolerance))


def _retrain_here(mode: str, force: bool, epochs: int | None, tolerance: float | None) -> int:
    from app.serving.retrain_plan import plan_retrain
    from app.serving.runner import RETRAIN_LEASE, acquire_retrain_lease, new_job_id

    settings, store = _store()
    overrides = (("retrain_epochs", epochs), ("promotion_tolerance", tolerance))
    settings = settings.model_copy(update={k: v for k, v in overrides if v is not None})
    if not force:
        plan = plan_retrain(store)
        if plan.nothing_new:
            store.dispose()
            return _print_outcome(plan.skipped())
    job_id = new_job_id()
    if not acquire_retrain_lease(store, job_id, settings.retrain_lease_s):
        _say(f"[red]retrain job {store.lease_holder(RETRAIN_LEASE)} is already running")
        store.dispose()
        return EXIT_FAILED
    with contextlib.ExitStack() as stack:
        fence = None
        if settings.redis_url:  # distributed: the workers' single-flight lock applies here too
            from app.distributed import LockHeartbeat, RetrainLock, redis_client

            lock = RetrainLock(redis_client(settings.redis_url), settings.retrain_lease_s)
            if not lock.acquire(job_id):
                store.release_lease(RETRAIN_LEASE, job_id)
                _say(f"[red]retrain job {lock.holder()} is already running")
                store.dispose()
                return EXIT_FAILED
            stack.callback(lock.release)
            stack.enter_context(LockHeartbeat(lock, settings.retrain_lease_s))
            fence = lock.owned
        result = _run_cli_retrain(store, settings, job_id, mode, fence)
    if result is None:
        return EXIT_FAILED
    if result["promoted"] and settings.redis_url:
        from app.distributed import publish_activated, redis_client

        publish_activated(redis_client(settings.redis_url), int(result["candidate_version"]))
    return _print_outcome({"status": "succeeded", "job_id": job_id, "result": result})


def _run_cli_retrain(store: Store, settings: Settings, job_id: str, mode: str,
                     fence: Callable[[], bool] | None) -> dict | None:
    """The job's result, or None when it failed or was cancelled (the message is printed)."""
    from app.serving.retrain_job import run_retrain_job
    from app.serving.runner import RETRAIN_LEASE

    try:
        store.create_job(job_id, mode, runner="cli")
        last: dict = {}

        def on_progress(p: dict) -> None:
            store.renew_lease(RETRAIN_LEASE, job_id, settings.retrain_lease_s)
            for line in progress_lines(p, last):
                _say(line)

        _say(f"retrain job {job_id} ({mode}) on {_safe_url(store.url)}")
        try:
            return run_retrain_job(store, settings, job_id, mode, on_progress=on_progress, fence=fence,
                                   actor="cli")
        except Exception as exc:
            _say(f"[red]retrain failed: {exc}")
            return None
    finally:
        store.release_lease(RETRAIN_LEASE, job_id)
        store.dispose()


def progress_lines(p: dict, last: dict) -> list[str]:
    """Lines for what changed in a job's progress since ``last`` (then updated to ``p``)."""
    lines = []
    phase = p.get("phase")
    if p.get("mode") and p.get("mode") != last.get("mode"):
        lines.append(f"mode {p['mode']}: {p.get('mode_reason', '')}")
    if phase == "features" and (phase != last.get("phase") or p.get("rows_done") != last.get("rows_done")):
        lines.append(f"features: {p.get('rows_done', 0)}/{p.get('rows_total', '?')} rows")
    nan = float("nan")
    if p.get("refit_iterations") is not None and p.get("refit_iterations") != last.get("refit_iterations"):
        lines.append(f"readout refit: {p['refit_iterations']}/{p.get('refit_max_iterations')} iterations "
                     f"(best {p.get('refit_best_iteration')}), val_loss={p.get('val_loss', nan):.4f} "
                     f"{_score(p)}")
    if p.get("epoch") and (p.get("epoch"), phase) != (last.get("epoch"), last.get("phase")):
        lines.append(f"epoch {p['epoch']}/{p.get('epochs')}: train_loss={p.get('train_loss', nan):.4f} "
                     f"val_loss={p.get('val_loss', nan):.4f} {_score(p)}")
    last.clear()
    last.update(p)
    return lines


def _say(line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True)  # no wrapping at 80 columns in logs


def _score(p: dict) -> str:
    if p.get("val_acc") is not None and p.get("val_acc") == p.get("val_acc"):  # not NaN
        return f"val_acc={p['val_acc']:.4f}"
    return f"val_rmse={p['val_rmse']:.4g}" if p.get("val_rmse") is not None else ""


def _print_outcome(job: dict) -> int:
    """Print what happened and return the exit code (0 promoted, 3 not, 4 nothing new, 1 failed)."""
    status = job.get("status")
    if status == "skipped":
        _say(f"[yellow]nothing to do[/]: {job.get('reason')}")
        console.print_json(json.dumps(job))
        return EXIT_NOTHING_NEW
    if status != "succeeded":
        _say(f"[red]retrain {job.get('job_id')} {status}[/]: {job.get('error')}")
        return EXIT_FAILED
    result = job.get("result") or {}
    verdict = "[green]promoted" if result.get("promoted") else "[yellow]not promoted"
    _say(f"{verdict}[/]: version {result.get('candidate_version')} ({result.get('mode')}) — "
         f"{result.get('reason')}")
    console.print_json(json.dumps(result))
    return EXIT_PROMOTED if result.get("promoted") else EXIT_REJECTED


def _admin_key(api_key: str | None) -> str:
    if api_key:
        return api_key
    from app.settings import get_settings

    settings = get_settings()
    if settings.api_key:
        return settings.api_key
    if settings.api_key_file.is_file():  # the key `skqk serve` generated on this host
        return settings.api_key_file.read_text().strip()
    _fail("--url needs the admin key: --api-key, SKQK_API_KEY or SKQK_API_KEY_FILE", EXIT_USAGE)
    raise AssertionError  # unreachable: _fail exits


def _retrain_remote(url: str, api_key: str | None, mode: str, force: bool, wait: bool, timeout: float,
                    poll: float) -> int:
    """POST /retrain to a service, then (with ``wait``) poll GET /retrain/{id} until it ends."""
    import httpx

    key = _admin_key(api_key)
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url.rstrip("/"), timeout=30.0) as client:
        try:
            r = client.post("/retrain", json={"mode": mode, "force": force}, headers={"X-API-Key": key})
        except httpx.HTTPError as exc:
            _say(f"[red]{url}: {type(exc).__name__}: {exc}")
            return EXIT_FAILED
        body = _json_or_text(r)
        if r.status_code == 200 and body.get("status") == "skipped":
            return _print_outcome(body)
        if r.status_code != 202:
            _say(f"[red]POST /retrain: {r.status_code} {body.get('error', body)}")
            return EXIT_FAILED
        job_id = body["job_id"]
        _say(f"retrain job {job_id} ({mode}) queued on {url}")
        if not wait:
            return EXIT_PROMOTED
        last: dict = {}
        while time.monotonic() < deadline:
            try:
                r = client.get(f"/retrain/{job_id}")
            except httpx.HTTPError as exc:  # a replica restarting, a blip: the job goes on
                _say(f"[yellow]status read failed ({type(exc).__name__}); retrying")
                time.sleep(poll)
                continue
            job = _json_or_text(r)
            if r.status_code == 200:
                for line in progress_lines(job.get("progress") or {}, last):
                    _say(line)
                if job.get("status") in ("succeeded", "failed", "cancelled"):
                    return _print_outcome(job)
            elif r.status_code == 404:
                _say(f"[red]job {job_id} vanished: {job.get('error')}")
                return EXIT_FAILED
            time.sleep(poll)
    _say(f"[red]job {job_id} did not end within {timeout:g}s (--timeout); it may still run")
    return EXIT_FAILED


def _json_or_text(r: object) -> dict:
    try:
        value = r.json()  # type: ignore[attr-defined]
    except ValueError:
        return {"error": getattr(r, "text", "")[:500]}
    return value if isinstance(value, dict) else {"error": str(value)[:500]}


@cli.command()
def worker(queues: str = typer.Option("gpu", help="Celery queues to consume"),
           concurrency: int = typer.Option(1, min=1, help="pool processes; one per GPU"),
           loglevel: str = typer.Option("info")) -> None:
    """Run a Celery retrain worker (distributed mode: needs SKQK_REDIS_URL).

    Prefork pool, one task per child process: the parent never initialises CUDA, and each
    retrain runs in a fresh child with its own CUDA context.
    """
    from app.settings import get_settings

    if not get_settings().redis_url:
        console.print("[red]skqk worker needs SKQK_REDIS_URL (the Celery broker)")
        raise typer.Exit(2)
    from workers.celery_app import celery_app

    celery_app.worker_main(["worker", "--queues", queues, "--concurrency", str(concurrency),
                            "--pool", "prefork", "--prefetch-multiplier", "1",
                            "--max-tasks-per-child", "1", "--loglevel", loglevel,
                            "--without-gossip", "--without-mingle"])


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
