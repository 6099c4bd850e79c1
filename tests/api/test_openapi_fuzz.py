"""The published OpenAPI document, checked, then fuzzed with schemathesis against a real server.

- ``/openapi.json`` validates as OpenAPI 3.1; every route is described in
  ``app.api.openapi.OPERATIONS``; every POST that reads a body has a ``requestBody``; the
  protected operations carry the ``X-API-Key`` scheme with their scope (ingest only while
  ``SKQK_INGEST_API_KEY`` is set);
- schemathesis generates valid and invalid requests for every operation (the admin key sent,
  so admin routes get past their check; schemathesis itself retries 2xx answers without and
  with a wrong key): no 5xx, every status, content type, header and body as documented;
- nothing is stored from rejected payloads: the sample table changes by exactly the
  ``accepted`` of the 2xx ``/ingest`` answers (less what a 2xx ``/samples/delete`` removed),
  the version table by the candidates of the retrain jobs that got a 202.

Bounded: ``MAX_EXAMPLES`` per operation, derandomised (the same cases every run), about
20-40 s on a 2-core machine.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.api.openapi import OPERATIONS, build_document
from app.settings import Settings
from tests.helpers.server import API_KEY, ServerProcess, copy_store, fast_env, wait_job

INGEST_KEY = "fuzz-ingest-key"
D = 64  # the template store serves digits: 64 features, classes 0-9
MAX_EXAMPLES = 25
NO_BODY_POSTS = {"/retrain/{job_id}/cancel"}  # reads no body (the job is in the path)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, template_data_dir: Path) -> Iterator[ServerProcess]:
    data_dir = copy_store(template_data_dir, tmp_path_factory.mktemp("fuzz"))
    server = ServerProcess(data_dir, fast_env(data_dir, SKQK_INGEST_API_KEY=INGEST_KEY,
                                              SKQK_RETRAIN_EPOCHS=1))
    server.start()
    yield server
    server.stop()


def _count(server: ServerProcess, table: str) -> int:
    with sqlite3.connect(server.data_dir / "skqk.db") as db:  # the server's own store file
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


class Ledger:
    """What the 2xx answers say was stored, against what the tables held before."""

    def __init__(self, server: ServerProcess) -> None:
        self.samples_before = _count(server, "samples")
        self.versions_before = _count(server, "model_versions")
        self.ingested = 0
        self.deleted = 0
        self.jobs: list[str] = []
        self.statuses: dict[str, set[int]] = {}


@pytest.fixture(scope="module")
def ledger(fuzz_server: ServerProcess) -> Ledger:
    return Ledger(fuzz_server)


@pytest.fixture(scope="module")
def api_schema(fuzz_server: ServerProcess, ledger: Ledger) -> Any:
    # the admin key for the ApiKeyAuth scheme: sent where the document asks for it, left out
    # or spoilt by the cases that test missing or wrong keys
    config = schemathesis.Config.from_dict({"auth": {"openapi": {"ApiKeyAuth": {"api_key": API_KEY}}}})
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", config=config)


@pytest.fixture(scope="module")
def document(fuzz_server: ServerProcess) -> dict[str, Any]:
    return httpx.get(f"{fuzz_server.url}/openapi.json", timeout=30).json()


# ---- the document ---------------------------------------------------------------------------------
def test_document_is_valid_openapi_and_describes_every_route(document: dict[str, Any]) -> None:
    validate(document)  # raises on anything that is not OpenAPI 3.1
    assert document["openapi"].startswith("3.")
    documented = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    assert documented <= set(OPERATIONS), f"routes missing from OPERATIONS: {documented - set(OPERATIONS)}"
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert "default" not in codes and "HTTPValidationError" not in str(op), (method, path)
            if method == "post" and path not in NO_BODY_POSTS:
                body = op.get("requestBody")
                assert body and body["content"]["application/json"]["schema"], (method, path)
                assert {"400", "413", "415", "422"} <= codes, (method, path, codes)
    scheme = document["components"]["securitySchemes"]["ApiKeyAuth"]
    assert scheme == {**scheme, "type": "apiKey", "in": "header", "name": "X-API-Key"}


def test_protected_operations_carry_the_key_scheme(document: dict[str, Any]) -> None:
    paths = document["paths"]
    for (method, path), op in OPERATIONS.items():
        doc_op = paths[path][method.lower()]
        if op.scope in ("admin", "ingest"):  # this server has an ingest key; no predict key
            assert doc_op["security"] == [{"ApiKeyAuth": [op.scope]}], (method, path)
            assert {"401", "403"} <= set(doc_op["responses"]), (method, path)
        else:
            assert "security" not in doc_op and "401" not in doc_op["responses"], (method, path)
    assert paths["/ingest"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/IngestRequest"}
    assert paths["/retrain"]["post"]["requestBody"]["required"] is False  # empty body: mode auto


def test_open_ingest_is_documented_without_security(fuzz_server: ServerProcess) -> None:
    """Without SKQK_INGEST_API_KEY /ingest is open, and the document says so."""
    from app.api.main import create_app

    def settings(**keys: str | None) -> Settings:  # explicit: whatever SKQK_* the environment holds
        return Settings(data_dir=fuzz_server.data_dir, api_key="k",
                        **{"ingest_api_key": None, "predict_api_key": None, **keys})

    app = create_app(settings()).fastapi
    doc = build_document(app, settings())
    assert "security" not in doc["paths"]["/ingest"]["post"]
    assert doc["paths"]["/retrain"]["post"]["security"] == [{"ApiKeyAuth": ["admin"]}]
    keyed = build_document(app, settings(predict_api_key="p"))
    assert keyed["paths"]["/predict"]["post"]["security"] == [{"ApiKeyAuth": ["predict"]}]


# ---- fuzzing --------------------------------------------------------------------------------------
def _widen(row: Any) -> Any:
    """A generated list of numbers, repeated to the served width (so the row reaches the model)."""
    if type(row) is list and row and all(type(v) in (int, float) for v in row):
        return (row * math.ceil(D / len(row)))[:D]
    return row


def _class(label: Any) -> Any:
    """A generated number label, made one of the served classes (0-9)."""
    if type(label) in (int, float) and math.isfinite(label):
        return int(label) % 10
    return label


def _reach_the_model(case: Any) -> None:
    """Valid cases only: stretch number rows to 64 features and number labels to a class
    (0-9), else nearly every one is a 422 and the model's answers go unchecked."""
    meta = case.meta
    if meta is None or meta.generation.mode is not GenerationMode.POSITIVE or type(case.body) is not dict:
        return
    path = case.operation.path
    if path in ("/predict", "/explain") and type(case.body.get("inputs")) is list:
        case.body["inputs"] = [_widen(r) for r in case.body["inputs"]]
    elif path.endswith(":explain"):
        for key in ("instances", "inputs"):
            if type(case.body.get(key)) is list:
                case.body[key] = [_widen(r) for r in case.body[key]]
    elif path == "/ingest" and type(case.body.get("samples")) is list:
        for sample in case.body["samples"]:
            if type(sample) is dict:
                sample["features"] = _widen(sample.get("features"))
                sample["label"] = _class(sample.get("label"))
    elif (path.endswith(("/infer", "/explain")) and type(case.body.get("inputs")) is list
          and len(case.body["inputs"]) == 1):
        tensor = case.body["inputs"][0]
        if type(tensor) is dict and _widen(tensor.get("data")) is not tensor.get("data"):
            tensor.update(data=_widen(tensor["data"]), shape=[1, D], datatype="FP32")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzz_every_operation(case: Any, ledger: Ledger) -> None:
    _reach_the_model(case)
    response = case.call_and_validate(timeout=60,
                                      excluded_checks=[positive_data_acceptance])  # rows must fit a model
    method, path, status = case.method.upper(), case.operation.path, response.status_code
    ledger.statuses.setdefault(f"{method} {path}", set()).add(status)
    if status >= 300:
        return
    body = response.json() if method == "POST" else None
    if path == "/ingest" and not body["duplicate"]:
        ledger.ingested += body["accepted"]
    elif path == "/samples/delete":
        ledger.deleted += body["affected"]
    elif path == "/retrain" and status == 202:  # 200: skipped, nothing new (no job)
        ledger.jobs.append(body["job_id"])


def test_nothing_stored_from_rejected_payloads(fuzz_server: ServerProcess, ledger: Ledger) -> None:
    assert ledger.statuses, "the fuzzing test did not run"
    assert ledger.ingested > 0 and 422 in ledger.statuses["POST /ingest"], ledger.statuses  # both kinds
    assert 200 in ledger.statuses["POST /predict"], ledger.statuses
    with fuzz_server.client() as client:
        candidates = sum(1 for job_id in ledger.jobs
                         if wait_job(client, job_id)["result"].get("candidate_version") is not None)
    assert _count(fuzz_server, "samples") == ledger.samples_before + ledger.ingested - ledger.deleted
    assert _count(fuzz_server, "model_versions") == ledger.versions_before + candidates
