"""`skqk experiment …` subcommands."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer

EXTRA_MODULES = ("matplotlib", "mlxtend")  # the `experiments` extra (not in the serving image)

experiment_app = typer.Typer(help="Reproduce the paper's experiments (tables + PNG plots).",
                             no_args_is_help=True)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _needs_experiments_extra() -> None:
    """Refuse up front, naming the extra, rather than after minutes of training at the first plot."""
    missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        typer.echo(f"skqk experiment needs the 'experiments' extra ({', '.join(missing)} not installed): "
                   "pip install 'skqk-serve[experiments]' (in a checkout: pip install -e '.[experiments]')",
                   err=True)
        raise typer.Exit(2)


@experiment_app.command()
def stability(dataset: str = typer.Option("digits", help="digits | mnist5k | synthetic"),
              arch: str = typer.Option("mlp:256-256,lenet5", help="comma-separated architectures"),
              out: Path = typer.Option(Path("experiments-out"), help="output directory"),
              seeds: int = typer.Option(5, min=1), epochs: int = typer.Option(30, min=2),
              batch_size: int = typer.Option(128, min=1), lr: float = typer.Option(1e-3),
              probe_size: int = typer.Option(512, min=8),
              device: str = typer.Option("auto", help="auto | cpu | cuda"),
              synthetic_n: int = typer.Option(20_000, min=100)) -> None:
    """Hypothesis 1: per-epoch gate flips vs train/val loss (mean ± std over seeds)."""
    _needs_experiments_extra()
    from app.experiments.stability import run_stability

    results = run_stability(dataset, _split(arch), seeds, epochs, out, batch_size=batch_size, lr=lr,
                            probe_size=probe_size, device=device, synthetic_n=synthetic_n,
                            log=typer.echo)
    for name, r in results["archs"].items():
        summary = r["summary"]
        typer.echo(f"{dataset}/{name}: gates flip <5%/epoch from epoch {summary['settled_epoch_5pct']}, "
                   f"<1% from {summary['settled_epoch_1pct']}; best val loss at epoch "
                   f"{summary['best_val_epoch']}")
    typer.echo(f"wrote {out}/stability_*.{{json,md,png}}")


@experiment_app.command()
def retrain(dataset: str = typer.Option("digits", help="digits | mnist5k | synthetic"),
            arch: str = typer.Option("mlp:256-256", help="mlp:W-W-…, lenet5, vgg-small"),
            out: Path = typer.Option(Path("experiments-out"), help="output directory"),
            seeds: int = typer.Option(5, min=1),
            new_fraction: str = typer.Option("0.2,0.5", help="share(s) of train that is new data"),
            shifts: str = typer.Option("none,brightness:0.3,contrast:0.5,classfreq:0.2",
                                       help="none | brightness:B | contrast:C | classfreq:F | offset:B | "
                                                 "noise:S, comma list"),
            methods: str = typer.Option(",".join(["none", "full_warm", "full_scratch", "qk_fast",
                                                  "qk_adam", "qk_random", "refresh"]),
                                        help="comma-separated"),
            epochs: int = typer.Option(30, min=1), patience: int = typer.Option(5, min=1),
            device: str = typer.Option("auto", help="auto | cpu | cuda"),
            synthetic_n: int = typer.Option(20_000, min=100)) -> None:
    """Hypothesis 2: no retrain vs full (warm/scratch) vs QK (fast/Adam/random init) vs refresh, ± shift."""
    _needs_experiments_extra()
    from app.core.training import TrainConfig
    from app.experiments.retrain import run_retrain

    cfg = TrainConfig(epochs=epochs, patience=patience, device=device)
    payload = run_retrain(dataset, arch, seeds, [float(v) for v in _split(new_fraction)], _split(shifts),
                          out, methods=_split(methods), cfg=cfg, synthetic_n=synthetic_n, log=typer.echo)
    for entry in payload["summary"]:
        cells = ", ".join(f"{m}={100 * e['test_acc'][0]:.2f}%/{e['wall_s'][0]:.2f}s"
                          for m, e in entry["methods"].items())
        typer.echo(f"new={entry['new_fraction']:g} shift={entry['shift']}: {cells}")
    typer.echo(f"wrote {out}/retrain_*.{{json,md,png}}")


@experiment_app.command()
def calibrate(directory: Path = typer.Argument(..., help="directory with retrain_*.json"),
              tolerance: float = typer.Option(0.3, help="allowed QK shortfall, in accuracy points")) -> None:
    """Drift signals vs the QK − full accuracy gap over retrain experiments; checks the rule."""
    _needs_experiments_extra()
    from app.experiments.calibrate import calibrate as run
    from app.experiments.calibrate import calibrate_modes

    result = run(directory, tolerance / 100)
    typer.echo(f"{len(result['groups'])} settings; rule agrees in {result['agree']}; "
               f"wrote {directory}/drift_calibration.{{md,png}}")
    modes = calibrate_modes(directory, tolerance / 100)
    if modes["groups"]:
        typer.echo(f"{len(modes['groups'])} settings with refresh; auto's pick within {tolerance} points of "
                   f"the best mode in {modes['agree']}; wrote {directory}/mode_calibration.{{md,png}}")
