"""``skqk predict FILE -o OUT.parquet|csv``: batch scoring with a stored version."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def predict(file: Path = typer.Argument(..., exists=True, dir_okay=False, help="CSV, Parquet or NPZ"),
            out: Path = typer.Option(..., "-o", "--out", help="OUT.parquet or OUT.csv"),
            version: int | None = typer.Option(None, "--version", help="version (default: active)"),
            keep: str | None = typer.Option(None, "--keep", help="columns a,b of FILE copied to the output "
                                                                 "(ids, keys)"),
            outputs: bool = typer.Option(False, "--outputs", help="add the raw outputs (logits per class)"),
            chunk_rows: int = typer.Option(50_000, min=1, help="rows read, scored and written at a time"),
            device: str = typer.Option("cpu", help="cpu | cuda | auto")) -> None:
    """Score a file with a stored version: the answers /predict gives for the same rows."""
    from app.intake.batch_scoring import ScoringError, score_file
    from app.settings import get_settings
    from app.storage import open_store

    try:
        from app.intake.files import DataFileError
    except ImportError as exc:
        console.print(f"[red]reading data files needs the 'files' extra: pip install "
                      f"'skqk-serve[files]' ({exc})")
        raise typer.Exit(2) from None
    store = open_store(get_settings().resolved_database_url)
    progress = Progress(TextColumn("[bold]predict"), BarColumn(), TextColumn("{task.fields[rows]:,} rows"),
                        TextColumn("{task.fields[rate]:,.0f} rows/s"), TextColumn("ETA"),
                        TimeRemainingColumn(), TimeElapsedColumn(), console=console, transient=False)
    bar = progress.add_task("predict", total=None, rows=0, rate=0.0)

    def on_chunk(p) -> None:  # ScoreProgress
        total, done = ((p.total_rows, p.rows) if p.total_rows is not None else
                       (file.stat().st_size, p.bytes_read or 0))
        progress.update(bar, total=total, completed=done, rows=p.rows, rate=p.rows_per_s)

    names = [c.strip() for c in (keep or "").split(",") if c.strip()]
    try:
        with progress:
            report = score_file(store, file, out, version, names, outputs, chunk_rows, device, on_chunk)
    except (ScoringError, DataFileError) as exc:
        console.print(f"[red]{file}: {exc}", highlight=False)
        raise typer.Exit(2) from None
    finally:
        store.dispose()
    unknown = (", unknown categories: " + ", ".join(f"{k}={v}" for k, v in report.unknown.items())
               if report.unknown else "")
    console.print(f"{report.rows:,} rows scored with version {report.version} → {out} "
                  f"({report.rows_per_s:,.0f} rows/s{unknown})", highlight=False)
