"""The inference fast path answers exactly like the FastAPI routes it shortcuts."""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path

import httpx

from app.api.main import create_app
from app.settings import Settings
from tests.helpers.server import ServerProcess

ROW = [0.25] * 64
V2 = "/v2/models/skqk/infer"
CASES = [
    ("/predict", {"inputs": [ROW, [0.5] * 64]}),
    ("/predict", {"inputs": [ROW[:3]]}),
    ("/predict", {"inputs": []}),
    ("/predict", {"inputs": [["x", *ROW[1:]]]}),
    ("/predict", '{"inputs": [[NaN' + ", 0" * 63 + "]]}"),
    ("/predict", "{broken"),
    ("/predict", {"inputs": [ROW, [*ROW[:-1], 1e39]]}),  # float32 overflow: found in the batch
    ("/predict", {"inputs": [ROW], "note": "extra keys take the validating parse"}),
    ("/predict", '{"inputs": [[0.5' + ", 0" * 63 + ']], "inputs": [[1' + ", 0" * 63 + "]]}"),
    (V2, {"id": "a", "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}),
    (V2, {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT8", "data": ROW}]}),
    ("/v2/models/skqk/versions/1/infer",
     {"id": "b", "inputs": [{"name": "input", "shape": [64], "datatype": "FP32", "data": ROW}]}),
    ("/v2/models/skqk/versions/77/infer",
     {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}),
    ("/v2/models/other/infer", {"inputs": []}),
]


def _ask(c: httpx.Client, path: str, payload: object) -> tuple[int, object]:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    r = c.post(path, content=body, headers={"Content-Type": "application/json"})
    return r.status_code, r.json()


def test_fast_path_and_fastapi_routes_agree(api_server: ServerProcess, server_factory) -> None:
    slow = server_factory(fast_path="false")
    statuses = set()
    with api_server.client() as fast_c, slow.client() as slow_c:
        for path, payload in CASES:
            fast, routed = _ask(fast_c, path, payload), _ask(slow_c, path, payload)
            assert fast == routed, (path, payload, fast, routed)
            statuses.add(fast[0])
    assert statuses == {200, 400, 404, 422}  # the cases cover answers and every error kind


def test_the_long_lived_heap_is_frozen_while_the_app_runs(tmp_path: Path) -> None:
    """Full collections must not walk torch's and FastAPI's objects under load (the p99 stalls)."""
    before = gc.get_threshold()
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/s.db", api_key="k")
    api = create_app(settings).fastapi

    async def run() -> None:
        async with api.router.lifespan_context(api):
            assert gc.get_freeze_count() > 10_000
            assert gc.get_threshold()[0] == 10_000

    asyncio.run(run())
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before  # collectable again
