"""`skqk experiment …` subcommands."""

from __future__ import annotations

import typer

experiment_app = typer.Typer(help="Reproduce the paper's experiments (tables + PNG plots).",
                             no_args_is_help=True)
