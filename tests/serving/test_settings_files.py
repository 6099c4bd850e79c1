"""SKQK_API_KEY_FILE / SKQK_DATABASE_URL_FILE: values kept in files (Docker secrets).

A file fills in a value that is unset; a value given directly (SKQK_API_KEY, SKQK_DATABASE_URL)
wins over the file; an unusable file is an error naming the variable and the path, and the
error never prints the other settings (the API key among them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings, resolve_api_key


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ("SKQK_API_KEY", "SKQK_API_KEY_FILE", "SKQK_DATABASE_URL", "SKQK_DATABASE_URL_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SKQK_DATA_DIR", str(tmp_path / "data"))
    return monkeypatch


def test_files_fill_in_unset_values(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "key").write_text("  from-the-file\n")
    (tmp_path / "url").write_text("postgresql+psycopg://skqk:pw@postgres:5432/skqk\n")
    clean_env.setenv("SKQK_API_KEY_FILE", str(tmp_path / "key"))
    clean_env.setenv("SKQK_DATABASE_URL_FILE", str(tmp_path / "url"))
    s = Settings()
    assert s.api_key == "from-the-file" and resolve_api_key(s) == "from-the-file"
    assert s.resolved_database_url == "postgresql+psycopg://skqk:pw@postgres:5432/skqk"
    assert not s.api_key_file.exists()  # nothing generated


def test_a_value_given_directly_wins_over_the_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "key").write_text("from-the-file\n")
    clean_env.setenv("SKQK_API_KEY_FILE", str(tmp_path / "key"))
    clean_env.setenv("SKQK_API_KEY", "from-the-env")
    clean_env.setenv("SKQK_DATABASE_URL_FILE", str(tmp_path / "not-read"))  # never opened
    clean_env.setenv("SKQK_DATABASE_URL", "sqlite:///direct.db")
    s = Settings()
    assert s.api_key == "from-the-env" and s.resolved_database_url == "sqlite:///direct.db"
    assert Settings(api_key="init-arg").api_key == "init-arg"


@pytest.mark.parametrize("problem", ["missing", "directory", "empty"])
def test_an_unusable_file_is_an_error_naming_it(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                                problem: str) -> None:
    path = tmp_path / "secret"
    if problem == "directory":  # what compose leaves where a secret file was missing
        path.mkdir()
    elif problem == "empty":
        path.write_text("\n")
    clean_env.setenv("SKQK_API_KEY", "must-not-be-printed")
    clean_env.setenv("SKQK_DATABASE_URL_FILE", str(path))
    with pytest.raises(ValidationError) as err:
        Settings()
    message = str(err.value)
    assert f"SKQK_DATABASE_URL_FILE={path}" in message
    assert ("is empty" if problem == "empty" else "cannot read it") in message
    assert "must-not-be-printed" not in message
