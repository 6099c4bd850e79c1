"""What every `skqk` command shares: the console, the store from the settings, failing
with a message and an exit code, and small option parsers."""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    from app.settings import Settings
    from app.storage import Store

console = Console()


def open_configured_store() -> tuple[Settings, Store]:
    """The settings and the store they name (schema upgraded on open)."""
    from app.settings import get_settings
    from app.storage import open_store

    settings = get_settings()
    return settings, open_store(settings.resolved_database_url)


def fail(message: str, code: int = 1) -> NoReturn:
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
