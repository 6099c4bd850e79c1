"""What every `skqk` command shares: the console, the store from the settings, failing
with a message and an exit code, and small option parsers."""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    from app.settings import Settings
    from app.storage import Store

# Not a terminal (a pipe, a log file, CI): no wrapping at 80 columns, which would split paths
# and JSON; rich still drops colour codes there.
console = Console(soft_wrap=not sys.stdout.isatty())

# Exit codes of the commands that take data (init, ingest, import, export), docs/OPERATIONS.md:
# 2 the command line, the file or its data is refused (nothing of it stored; ingest: the chunks
# committed before a bad row stay, and a re-run skips them); 1 the store's state or a failure
# stops it (init on a store with versions and no --force, ingest with no active version, the
# store unreachable); 130 interrupted.
EXIT_STATE, EXIT_REFUSED = 1, 2


def finite_json(values: dict) -> str:
    """JSON for a summary line: a non-finite number (regression has no accuracy: NaN) is null,
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


def open_configured_store() -> tuple[Settings, Store]:
    """The settings and the store they name (schema upgraded on open)."""
    from app.settings import get_settings
    from app.storage import open_store

    settings = get_settings()
    return settings, open_store(settings.resolved_database_url)


def fail(message: str, code: int = EXIT_STATE) -> NoReturn:
    console.print(f"[red]{message}", highlight=False)
    raise typer.Exit(code)


def say(line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True)  # no wrapping at 80 columns in logs


def names(text: str | None) -> list[str]:
    """``"a, b,c"`` → ``["a", "b", "c"]`` (empty parts dropped)."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
