"""The commands docker-compose.yml runs, so integration tests start the very same ones."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_command(service: str, **overrides: str) -> list[str]:
    """The service's command, with ``--option value`` pairs replaced (e.g. port="8123")."""
    cmd = list(compose()["services"][service]["command"])
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if flag in cmd:
            cmd[cmd.index(flag) + 1] = value
        else:
            cmd += [flag, value]
    return cmd
