"""`skqk init` (train and register version 1) and `skqk ingest FILE` (exactly-once file import)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from app.cli.common import (
    EXIT_REFUSED,
    EXIT_STATE,
    console,
    fail,
    finite_json,
    names,
    open_configured_store,
    safe_url,
)


def with_activation(arch: str, activation: str | None, input_shape: str | None) -> str:
    """``--activation`` / ``--input-shape`` folded into the architecture name (see resolve_arch)."""
    from app.core.spec import activation_layer

    if activation:
        try:
            activation_layer(activation)
        except ValueError as exc:
            fail(str(exc), 2)
        if arch.strip().startswith("{"):
            fail("--activation applies to named architectures; write it into the JSON spec", 2)
    if input_shape and not arch.startswith("cnn1d:"):
        fail("--input-shape goes with --arch cnn1d:…", 2)
    base = arch.split("+")[0] if activation else arch
    if input_shape:
        base = f"{base}@{input_shape}"
    return f"{base}+{activation}" if activation else base


def epoch_progress(total: int) -> tuple[Progress, object]:
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), console=console, transient=False)
    task = progress.add_task("training", total=total, info="")
    return progress, task


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
         categorical: str | None = typer.Option(None, "--categorical", help="--data: columns a,b read as "
                                                "categories (text columns are by default; integers not)"),
         numeric: str | None = typer.Option(None, "--numeric", help="--data: columns read as numbers"),
         drop: str | None = typer.Option(None, "--drop", help="--data: columns left out"),
         normalize: str = typer.Option("standard", help="--data: standard (per-feature mean/std, part of "
                                                        "the model) | none"),
         arch: str = typer.Option("mlp:256-256", help="mlp:W-W-…, cnn1d:W-W-…, lenet5, vgg-small or "
                                                               "JSON spec"),
         activation: str | None = typer.Option(
             None, "--activation",
             help="relu (default) | leaky_relu:ALPHA | prelu | relu6 | hardtanh:MIN,MAX"),
         input_shape: str | None = typer.Option(None, "--input-shape",
                                                help="cnn1d: C,L (channels, length) of each row"),
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
    from app.intake.bootstrap import bootstrap_table

    if normalize not in ("standard", "none"):
        fail("--normalize must be standard or none", 2)
    if data is None and (label_column or features or classes or task != "classification" or categorical
                         or numeric or drop):
        fail("--label-column, --features, --classes, --task, --categorical, --numeric and --drop go with "
             "--data FILE", 2)
    if data is not None and not label_column:
        fail("--data needs --label-column (the column holding the labels)", 2)
    settings, store = open_configured_store()
    existing = store.latest_version()
    if existing is not None and if_empty:
        console.print(f"store already has versions (latest {existing}, active {store.active_version()}); "
                      "nothing to do")
        store.dispose()
        return
    if existing is not None and not force:
        fail(f"the store ({safe_url(store.url)}) already has versions (latest {existing}, "
              f"active {store.active_version()}); pass --force to register another one")
    from app.intake.training_table import ColumnTypes

    types = ColumnTypes(tuple(names(categorical)), tuple(names(numeric)), tuple(names(drop)))
    table = _init_table(dataset, data, label_column, features, task, classes, normalize == "standard", seed,
                        types)
    arch = with_activation(arch, activation, input_shape)
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
            fail(str(exc), 2)
    elapsed = time.perf_counter() - started
    metrics = {**result.metrics, "init_seconds": elapsed}
    score = (f"holdout_acc={metrics['holdout_acc']:.4f}" if "holdout_acc" in metrics else
             f"holdout_rmse={metrics['holdout_rmse']:.4g} holdout_r2={metrics['holdout_r2']:.4f}")
    console.print(f"version {result.version} (active): {score} "
                  f"({elapsed:.1f}s, {metrics['epochs_run']} epochs) → {safe_url(store.url)}")
    console.print_json(finite_json(metrics))
    store.dispose()


def _init_table(dataset: str, data: Path | None, label_column: str | None, features: str | None,
                task: str, classes: str | None, normalize: bool, seed: int, types=None):  # -> TrainingTable
    from app.core.features import SchemaError
    from app.intake.training_table import table_from_dataset, table_from_file

    if data is None:
        return table_from_dataset(dataset, seed=seed)
    try:
        from app.intake.files import DataFileError
    except ImportError as exc:  # pyarrow missing: the files extra
        fail(f"reading data files needs the 'files' extra: pip install 'skqk-serve[files]' ({exc})", 2)
    try:
        return table_from_file(data, names(label_column), names(features) if features else None, task,
                               names(classes) if classes else None, normalize, types)
    except (DataFileError, SchemaError) as exc:
        fail(f"{data}: {exc}", 2)




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
    from app.intake.file_ingest import FileIngestError, ingest_file
    from app.serving.version_schema import schema_of

    settings, store = open_configured_store()
    active = store.active_version()
    if active is None:
        store.dispose()
        fail("the store has no active model version: run `skqk init` (or `skqk serve`) first", EXIT_STATE)
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
        report = ingest_file(store, schema, file, names(label_column) or None, chunk_rows, start_row,
                             check_ranges=settings.input_range != "off", on_chunk=on_chunk)
        if progress.live.is_started:  # the final figures, the same as the summary's
            progress.update(bar, completed=progress.tasks[0].total, rows=report.rows_read,
                            rate=report.rows_per_s)
    except FileIngestError as exc:
        progress.stop()
        fail(str(exc), EXIT_REFUSED)
    except ImportError as exc:
        fail(f"reading data files needs the 'files' extra: pip install 'skqk-serve[files]' ({exc})",
             EXIT_REFUSED)
    except KeyboardInterrupt:
        progress.stop()
        fail("interrupted: every chunk committed so far is stored; run the same command again to "
             "continue (stored chunks are skipped)", 130)
    finally:
        progress.stop()
        store.dispose()
    console.print(f"{report.rows_stored} rows stored, {report.rows_skipped} already stored (skipped), "
                  f"{report.chunks} chunks, {report.rows_per_s:,.0f} rows/s; store total "
                  f"{report.total_samples} samples (version {active}'s schema)")


def _ingest_progress() -> Progress:
    from rich.progress import TimeRemainingColumn

    return Progress(TextColumn("[bold]ingest"), BarColumn(), TextColumn("{task.fields[rows]:,} rows"),
                    TextColumn("{task.fields[rate]:,.0f} rows/s"), TextColumn("elapsed"), TimeElapsedColumn(),
                    TextColumn("left"), TimeRemainingColumn(), console=console, transient=False)
