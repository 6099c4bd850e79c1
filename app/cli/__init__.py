"""`skqk` command line (``app.cli:main``; ``python -m app.cli``)."""

from app.cli.main import cli, main

__all__ = ["cli", "main"]
