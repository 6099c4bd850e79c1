"""``SKQK_API_KEY_FILE`` (issue 20, item 7): a key file every user can read is warned about, and
the log says the key came from that file (it said ``SKQK_API_KEY``). A real ``skqk serve``."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.helpers.server import ServerProcess, copy_store, fast_env


@pytest.mark.parametrize("mode", [0o644, 0o600])
def test_key_file_source_logged_and_loose_mode_warned(template_data_dir: Path, tmp_path: Path,
                                                      mode: int) -> None:
    data_dir = copy_store(template_data_dir, tmp_path / "data")
    key_file = tmp_path / "admin.key"
    key_file.write_text("from-the-file-0123456789\n")
    key_file.chmod(mode)
    env = fast_env(data_dir, SKQK_API_KEY_FILE=str(key_file))
    env.pop("SKQK_API_KEY")
    with ServerProcess(data_dir, env) as server:
        r = httpx.get(f"{server.url}/samples/audit", headers={"X-API-Key": "from-the-file-0123456789"})
        assert r.status_code == 200, r.text  # the file's key is the admin key
        log = " ".join(server.log().split())
    packed = "".join(log.split())  # rich wraps the console line at the terminal width
    assert f"adminkeyfromSKQK_API_KEY_FILE={key_file}" in packed, log[-3000:]
    warned = "is readable by every user of this machine" in log
    assert warned == (mode == 0o644), log[-3000:]
    assert "from-the-file-0123456789" not in log  # the key itself is never logged
