"""`skqk` command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from app.core.training import TrainConfig
from app.experiments.cli import experiment_app

cli = typer.Typer(help="skqk-serve: serve ReLU nets as selector+estimator; cheap QK retrains.",
                  no_args_is_help=True, add_completion=False)
cli.add_typer(experiment_app, name="experiment")
console = Console()


@cli.callback()
def _root() -> None:
    """skqk-serve command line."""


def epoch_progress(total: int) -> tuple[Progress, object]:
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), console=console, transient=False)
    task = progress.add_task("training", total=total, info="")
    return progress, task


@cli.command()
def init(dataset: str = typer.Option("digits", help="digits | mnist5k | synthetic"),
         arch: str = typer.Option("mlp:256-256", help="mlp:W-W-…, lenet5, vgg-small or JSON spec"),
         epochs: int = typer.Option(30, min=1), batch_size: int = typer.Option(128, min=1),
         lr: float = typer.Option(1e-3), seed: int = typer.Option(0),
         device: str = typer.Option("auto", help="auto | cpu | cuda"),
         out: Path | None = typer.Option(None, help="checkpoint directory (default: data dir)")
         ) -> None:
    """Train step 1 (a plain ReLU net) and register it as version 1."""
    from app.core.pipeline import train_initial
    from app.storage.checkpoint_dir import DirectoryRegistry

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)
    progress, task = epoch_progress(epochs)
    started = time.perf_counter()
    with progress:
        def on_epoch(m: dict) -> None:
            progress.update(task, completed=m["epoch"],
                            info=f"val_acc={m['val_acc']:.3f} gate_flip={m.get('gate_flip', 0):.4f}")
        initial = train_initial(dataset, arch, cfg, on_epoch)
    elapsed = time.perf_counter() - started
    metrics = {**initial.metrics(), "init_seconds": elapsed}
    registry = DirectoryRegistry(out)
    version = registry.register(initial.model, mode="full", parent=None, metrics=metrics)
    console.print(f"version {version}: test_acc={initial.test_acc:.4f} "
                  f"({elapsed:.1f}s, {metrics['epochs_run']} epochs) → {registry.root}")
    console.print_json(json.dumps(metrics))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
