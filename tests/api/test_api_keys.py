"""Scoped API keys over HTTP: an ingest key, a predict key (read from a file), the admin key.

Two real servers with the same keys, one answering inference on the fast path and one on
FastAPI's routes (``SKQK_FAST_PATH=false``): 401 without a key or with an unknown one, 403
with a known key lacking the scope, the admin key everywhere; nothing is stored from a
refused ``/ingest``. Without these settings ``/ingest`` and inference stay open (the rest of
tests/api runs that way).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from app.api.auth import ApiKeys
from app.settings import Settings
from tests.helpers.server import API_KEY, ServerProcess, copy_store, fast_env

INGEST_KEY = "ingest-key-for-tests"
PREDICT_KEY = "predict-key-for-tests"
D = 64
ROW = [0.25] * D
KEYS = {"none": None, "wrong": "not-a-key", "ingest": INGEST_KEY, "predict": PREDICT_KEY, "admin": API_KEY}


def _start(tmp: Path, template: Path, **overrides: str) -> ServerProcess:
    data_dir = copy_store(template, tmp / "data")
    key_file = tmp / "predict.key"
    key_file.write_text(PREDICT_KEY + "\n")  # a secret mount: the newline is stripped
    env = fast_env(data_dir, SKQK_INGEST_API_KEY=INGEST_KEY, SKQK_PREDICT_API_KEY_FILE=key_file, **overrides)
    return ServerProcess(data_dir, env).start()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, template_data_dir: Path) -> Iterator[ServerProcess]:
    server = _start(tmp_path_factory.mktemp("keyed"), template_data_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed_no_fast_path(tmp_path_factory: pytest.TempPathFactory,
                       template_data_dir: Path) -> Iterator[ServerProcess]:
    server = _start(tmp_path_factory.mktemp("keyed-routes"), template_data_dir, SKQK_FAST_PATH="false")
    yield server
    server.stop()


def _post(server: ServerProcess, path: str, body: dict, key: str) -> httpx.Response:
    headers = {} if KEYS[key] is None else {"X-API-Key": KEYS[key]}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def _expect(r: httpx.Response, status: int, needle: str = "") -> None:
    assert r.status_code == status, r.text
    if status >= 400:
        assert needle in r.json()["error"], r.text
    if status == 401:
        assert r.headers["WWW-Authenticate"] == "ApiKey"


def _sample_count(server: ServerProcess) -> int:
    return httpx.get(server.url + "/samples/count", timeout=30).json()["total"]  # open: no key


def test_ingest_needs_the_ingest_or_the_admin_key(keyed: ServerProcess) -> None:
    before = _sample_count(keyed)
    sample = {"samples": [{"features": ROW, "label": 3}]}
    _expect(_post(keyed, "/ingest", sample, "none"), 401, "missing X-API-Key header (ingest endpoint")
    _expect(_post(keyed, "/ingest", sample, "wrong"), 401, "invalid X-API-Key")
    _expect(_post(keyed, "/ingest", sample, "predict"), 403, "grants predict, not ingest")
    assert _sample_count(keyed) == before  # nothing stored from the refused calls
    _expect(_post(keyed, "/ingest", sample, "ingest"), 200)
    _expect(_post(keyed, "/ingest", sample, "admin"), 200)  # admin implies every scope
    assert _sample_count(keyed) == before + 2


@pytest.mark.parametrize("server_fixture", ["keyed", "keyed_no_fast_path"])
def test_inference_needs_the_predict_or_the_admin_key(server_fixture: str,
                                                      request: pytest.FixtureRequest) -> None:
    server: ServerProcess = request.getfixturevalue(server_fixture)
    v2 = {"inputs": [{"name": "input", "shape": [1, D], "datatype": "FP32", "data": ROW}]}
    for path, body in (("/predict", {"inputs": [ROW]}), ("/v2/models/skqk/infer", v2),
                       ("/v2/models/skqk/versions/1/infer", v2)):
        _expect(_post(server, path, body, "none"), 401, "missing X-API-Key header (predict endpoint")
        _expect(_post(server, path, body, "wrong"), 401, "invalid X-API-Key")
        refused = _post(server, path, body, "ingest")
        _expect(refused, 403, "grants ingest, not predict")
        if path.startswith("/v2"):
            assert list(refused.json()) == ["error"]
        _expect(_post(server, path, body, "predict"), 200)
        _expect(_post(server, path, body, "admin"), 200)
    # reading metadata needs no key
    assert httpx.get(server.url + "/v2/models/skqk", timeout=30).status_code == 200


def test_admin_routes_need_the_admin_key(keyed: ServerProcess) -> None:
    for key in ("ingest", "predict"):
        _expect(_post(keyed, "/retrain", {"mode": "qk"}, key), 403, f"grants {key}, not admin")
        _expect(_post(keyed, "/models/1/activate", {}, key), 403, f"grants {key}, not admin")
    _expect(_post(keyed, "/retrain", {"mode": "qk"}, "none"), 401, "missing X-API-Key header (admin endpoint")
    _expect(_post(keyed, "/retrain", {"mode": "turbo"}, "admin"), 422, "mode")  # past the key check
    r = httpx.get(keyed.url + "/samples", headers={"X-API-Key": INGEST_KEY}, timeout=30)
    _expect(r, 403, "grants ingest, not admin")


def test_scopes_of_a_key() -> None:
    keys = ApiKeys(admin=b"a", ingest=b"i", predict=b"i")  # one key may hold two scopes
    assert keys.granted(b"a") == {"admin", "ingest", "predict"}
    assert keys.granted(b"i") == {"ingest", "predict"}
    assert keys.granted(b"x") == set() and keys.granted(b"") == set()
    open_keys = ApiKeys(admin=b"a")
    open_keys.check("ingest", None)  # unset: open
    open_keys.check("predict", b"anything")


def test_key_files_are_read_at_start_up(tmp_path: Path) -> None:
    key_file = tmp_path / "ingest.key"
    key_file.write_text("  from-file \n")
    assert Settings(data_dir=tmp_path, ingest_api_key=None, ingest_api_key_file=key_file).ingest_api_key \
        == "from-file"
    both = Settings(data_dir=tmp_path, ingest_api_key="direct", ingest_api_key_file=key_file)
    assert both.ingest_api_key == "direct"  # the value given directly wins
    with pytest.raises(ValidationError, match="SKQK_PREDICT_API_KEY_FILE"):
        Settings(data_dir=tmp_path, predict_api_key=None, predict_api_key_file=tmp_path / "missing.key")
    key_file.write_text("\n")
    with pytest.raises(ValidationError, match="is empty"):
        Settings(data_dir=tmp_path, ingest_api_key=None, ingest_api_key_file=key_file)
