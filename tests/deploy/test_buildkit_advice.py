"""docker-compose 1.29.2 ignores DOCKER_BUILDKIT / COMPOSE_DOCKER_CLI_BUILD in .env (the build then
fails: "the --mount option requires BuildKit"); only exporting them in the shell works. The
advice where users read it says so, and .env.example sets neither as a .env line."""

from __future__ import annotations

import re

from tests.compose import COMPOSE_FILE

REPO = COMPOSE_FILE.parent
EXPORT = "export DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1"


def test_env_example_says_export_and_sets_nothing() -> None:
    example = (REPO / ".env.example").read_text()
    # neither as a setting nor as a commented-out setting to uncomment (`# DOCKER_BUILDKIT=1`)
    assert not re.search(r"^#?\s*(DOCKER_BUILDKIT|COMPOSE_DOCKER_CLI_BUILD)=", example, re.M)
    assert EXPORT in example and "do NOT read these two from this" in example


def test_readme_compose_file_and_distributed_doc_say_export() -> None:
    for path in (REPO / "README.md", COMPOSE_FILE, REPO / "docs" / "DISTRIBUTED.md"):
        text = path.read_text()
        assert EXPORT in text, path
        assert "v1 works the same" not in text and "docker-compose v1 works the same" not in text
