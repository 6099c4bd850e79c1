"""The `skqk` command: one Typer app; each subject's commands live in their own module."""

from __future__ import annotations

import typer

from app.cli.data import ingest, init
from app.cli.explain import explain_command
from app.cli.networks import export, import_model_command
from app.cli.retrain import retrain
from app.cli.samples import samples_app
from app.cli.scoring import predict
from app.cli.serve import serve, worker
from app.experiments.cli import experiment_app

cli = typer.Typer(help="skqk-serve: serve ReLU nets as selector+estimator; cheap QK retrains.",
                  no_args_is_help=True, add_completion=False)
cli.add_typer(experiment_app, name="experiment")
cli.add_typer(samples_app, name="samples")
cli.command()(init)
cli.command()(ingest)
cli.command("import")(import_model_command)
cli.command("explain")(explain_command)
for command in (export, serve, retrain, worker, predict):
    cli.command()(command)


@cli.callback()
def _root() -> None:
    """skqk-serve command line."""


def main() -> None:
    cli()
