"""Feature schemas over HTTP: named rows, class names, regression, v2 tensors, ranges, counts.

Each model kind gets its own small SQLite store, built here (no training: a seeded net is
enough to check what the API does with names, labels and shapes), served by a real
``skqk serve`` process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from app.core.features import FeatureSchema
from app.core.network import DecoupledModel, ReLUNet
from app.core.spec import ArchSpec, mlp
from app.serving.models import load_model, register_model
from app.storage import Store, open_store
from tests.helpers.server import ServerProcess, fast_env

FEATURES = ("age", "bmi", "bp", "chol")
CLASSES = ("benign", "malignant", "unknown")
LOW, HIGH = (0.0, 10.0, 50.0, 100.0), (120.0, 60.0, 200.0, 400.0)
ROW = {"age": 61, "bmi": 27.4, "bp": 130.0, "chol": 210.5}
LIST_ROW = [ROW[n] for n in FEATURES]
OUT_OF_RANGE = {**ROW, "bp": 250.0}

CNN = ArchSpec(input_shape=(1, 4, 4), name="tiny-cnn", layers=(
    {"type": "conv", "out": 2, "kernel": 3, "padding": 1}, {"type": "relu"}, {"type": "flatten"},
    {"type": "linear", "out": 3}))


# ---- stores and servers ------------------------------------------------------------------------
def _classifier() -> tuple[ArchSpec, FeatureSchema]:
    spec = mlp([4, 16, 3]).with_affines(input_norm=((60.0, 25.0, 120.0, 200.0), (15.0, 5.0, 20.0, 40.0)))
    schema = FeatureSchema(feature_names=FEATURES, input_shape=(4,), num_classes=3, class_names=CLASSES,
                           label_column="diagnosis", range_min=LOW, range_max=HIGH)
    return spec, schema


def _regressor(targets: tuple[str, ...]) -> tuple[ArchSpec, FeatureSchema]:
    t = len(targets)
    spec = mlp([3, 16, t]).with_affines(input_norm=((1.0, 2.0, 3.0), (1.0, 1.0, 2.0)),
                                        output_affine=(tuple(100.0 * (i + 1) for i in range(t)), (50.0,) * t))
    schema = FeatureSchema(feature_names=("rooms", "area", "year"), input_shape=(3,), task="regression",
                           target_names=targets)
    return spec, schema


MODELS: dict[str, Callable[[], tuple[ArchSpec, FeatureSchema | None]]] = {
    "clf": _classifier, "reg1": lambda: _regressor(("price",)), "reg2": lambda: _regressor(("lat", "lon")),
    "old-cnn": lambda: (CNN, None)}  # registered without a schema, like versions from before schemas
# Servers cost seconds to start: the route-vs-fast-path comparison doubles as the "off" check.
SLOW_OFF = {"fast_path": "false", "input_range": "off"}


def make_store(data_dir: Path, kind: str) -> None:
    spec, schema = MODELS[kind]()
    store = open_store(f"sqlite:///{data_dir}/skqk.db")
    model = DecoupledModel.from_net(ReLUNet(spec, seed=0))
    version = register_model(store, model, "full", None, {}, data_watermark=None, schema=schema)
    store.activate(version, actor="test", reason="test")
    store.dispose()


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """``serve(kind, **SKQK_overrides)`` → a running server on its own store (one per key)."""
    servers: dict[tuple[str, tuple[tuple[str, str], ...]], ServerProcess] = {}

    def start(kind: str, **overrides: str) -> ServerProcess:
        key = (kind, tuple(sorted(overrides.items())))
        if key not in servers:
            data_dir = tmp_path_factory.mktemp(kind)
            make_store(data_dir, kind)
            env = fast_env(data_dir, **{f"SKQK_{k.upper()}": v for k, v in overrides.items()})
            servers[key] = ServerProcess(data_dir, env).start()
        return servers[key]

    yield start
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def clf(serve: Callable[..., ServerProcess]) -> Iterator[httpx.Client]:
    with serve("clf").client() as c:
        yield c


def _client(serve: Callable[..., ServerProcess], kind: str, **overrides: str) -> httpx.Client:
    return serve(kind, **overrides).client()


def _error(r: httpx.Response, status: int = 422) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body.get("error"), str), body
    return body["error"]


def _count(c: httpx.Client) -> int:
    r = c.get("/samples/count")
    assert r.status_code == 200, r.text
    return r.json()["total"]


def _metric(c: httpx.Client, line_prefix: str) -> float:
    m = re.search(rf"^{re.escape(line_prefix)} (\S+)$", c.get("/metrics").text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _store(server: ServerProcess) -> Store:
    return Store(f"sqlite:///{server.data_dir / 'skqk.db'}")


def _v2_features(rows: list[dict[str, Any]], names: tuple[str, ...], column: bool = False) -> dict:
    shape = [len(rows), 1] if column else [len(rows)]
    return {"inputs": [{"name": n, "datatype": "FP32", "shape": shape,
                        "data": [[r[n]] for r in rows] if column else [r[n] for r in rows]} for n in names]}


# ---- /predict: named rows, class names ------------------------------------------------------------
def test_named_rows_predict_like_lists_with_class_names(clf: httpx.Client) -> None:
    shuffled = {k: ROW[k] for k in reversed(FEATURES)}  # key order does not matter
    other = [30.0, 22.0, 110.0, 180.0]
    r = clf.post("/predict", json={"inputs": [shuffled, other, LIST_ROW]})
    assert r.status_code == 200, r.text
    body = r.json()
    listed = clf.post("/predict", json={"inputs": [LIST_ROW, other, LIST_ROW]}).json()
    assert body["outputs"] == listed["outputs"] and body["model_version"] == 1
    indices = np.array(body["outputs"]).argmax(1).tolist()
    assert body["prediction_indices"] == indices == listed["prediction_indices"]
    assert body["predictions"] == [CLASSES[i] for i in indices] == listed["predictions"]


@pytest.mark.parametrize(("row", "needle"), [
    ({**{k: v for k, v in ROW.items() if k != "bmi"}, "bmj": 27.4},
     "inputs[1]: unknown feature 'bmj' (did you mean 'bmi'?)"),
    ({k: v for k, v in ROW.items() if k != "chol"}, "inputs[1]: missing feature 'chol'"),
    ({**ROW, "height": 180}, "inputs[1]: unknown feature 'height'"),
    ({**ROW, "bmi": "27.4"}, "inputs[1].bmi: expected a number, got string"),
    ({**ROW, "age": True}, "inputs[1].age: expected a number, got boolean"),
    ({**ROW, "age": None}, "inputs[1].age: expected a number, got null"),
    ({**ROW, "age": [61]}, "inputs[1].age: expected a number, got array"),
    ({**ROW, "chol": 1e39}, "inputs[1].chol: value is out of float32 range"),
    ("61,27.4", "inputs[1]: expected a list of 4 numbers or an object keyed by feature name, got string"),
])
def test_predict_names_the_bad_field(clf: httpx.Client, row: Any, needle: str) -> None:
    assert needle in _error(clf.post("/predict", json={"inputs": [ROW, row]}))


def test_predict_named_row_with_nan_is_refused(clf: httpx.Client) -> None:
    body = '{"inputs": [{"age": 61, "bmi": NaN, "bp": 130, "chol": 200}]}'
    r = clf.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert "inputs[0].bmi: value is not a finite number" in _error(r)


# ---- /ingest: named rows, class-name labels -----------------------------------------------------
def test_ingest_named_rows_and_class_name_labels(serve: Callable[..., ServerProcess],
                                                 clf: httpx.Client) -> None:
    before = _count(clf)
    samples = [{"features": ROW, "label": "malignant"},
               {"features": LIST_ROW, "label": 0},
               {"features": {**ROW, "age": 40}, "label": "unknown"}]
    r = clf.post("/ingest", json={"samples": samples, "idempotency_key": "named-1"})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 3, "total_samples": before + 3, "duplicate": False}
    assert _count(clf) == before + 3
    store = _store(serve("clf"))
    try:
        stored = store.load_samples(4)
    finally:
        store.dispose()
    np.testing.assert_allclose(stored.x[-3:], [LIST_ROW, LIST_ROW, [40, *LIST_ROW[1:]]], rtol=1e-6)
    assert stored.y[-3:].tolist() == [1, 0, 2]


@pytest.mark.parametrize(("sample", "needle"), [
    ({"features": {**{k: v for k, v in ROW.items() if k != "bmi"}, "bmj": 27.4}, "label": 1},
     "samples[1].features: unknown feature 'bmj' (did you mean 'bmi'?)"),
    ({"features": {k: v for k, v in ROW.items() if k != "age"}, "label": 1},
     "samples[1].features: missing feature 'age'"),
    ({"features": {**ROW, "extra": 1}, "label": 1}, "samples[1].features: unknown feature 'extra'"),
    ({"features": {**ROW, "bp": "high"}, "label": 1},
     "samples[1].features.bp: expected a number, got string"),
    ({"features": ROW, "label": "malign"}, "samples[1].label: unknown class 'malign'"),
    ({"features": ROW, "label": 3}, "samples[1].label: must be in [0, 2], got 3"),
    ({"features": ROW, "label": True}, "samples[1].label"),
    ({"features": ROW, "label": 1.0}, "samples[1].label"),
    ({"features": OUT_OF_RANGE, "label": 1},
     "samples[1].features: feature 'bp' = 250 is outside its range [50, 200]"),
])
def test_ingest_refuses_and_stores_nothing(clf: httpx.Client, sample: dict, needle: str) -> None:
    before = _count(clf)
    r = clf.post("/ingest", json={"samples": [{"features": ROW, "label": 0}, sample]})
    assert needle in _error(r)
    assert _count(clf) == before


# ---- ranges ------------------------------------------------------------------------------------------
def test_out_of_range_predictions_are_served_and_counted_under_warn(clf: httpx.Client) -> None:
    counter = 'skqk_input_out_of_range_rows_total{endpoint="predict"}'
    before = _metric(clf, counter)
    r = clf.post("/predict", json={"inputs": [OUT_OF_RANGE, ROW, {**ROW, "age": -5}]})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 3
    assert _metric(clf, counter) == before + 2
    v2 = clf.post("/v2/models/skqk/infer", json=_v2_features([OUT_OF_RANGE], FEATURES))
    assert v2.status_code == 200, v2.text
    assert _metric(clf, 'skqk_input_out_of_range_rows_total{endpoint="v2"}') >= 1


def test_reject_refuses_out_of_range_predictions(serve: Callable[..., ServerProcess]) -> None:
    with _client(serve, "clf", input_range="reject") as c:
        r = c.post("/predict", json={"inputs": [ROW, OUT_OF_RANGE]})
        assert "inputs[1]: feature 'bp' = 250 is outside its range [50, 200]" in _error(r)
        r = c.post("/v2/models/skqk/infer", json=_v2_features([OUT_OF_RANGE], FEATURES))
        assert "'bp' = 250" in _error(r) and list(r.json()) == ["error"]
        assert c.post("/predict", json={"inputs": [ROW]}).status_code == 200


def test_range_checks_off(serve: Callable[..., ServerProcess]) -> None:
    with _client(serve, "clf", **SLOW_OFF) as c:
        before = _count(c)
        assert c.post("/predict", json={"inputs": [OUT_OF_RANGE]}).status_code == 200
        r = c.post("/ingest", json={"samples": [{"features": OUT_OF_RANGE, "label": "benign"}]})
        assert r.status_code == 200, r.text
        assert _count(c) == before + 1
        assert _metric(c, 'skqk_input_out_of_range_rows_total{endpoint="predict"}') == 0


# ---- v2 ---------------------------------------------------------------------------------------------
def test_v2_metadata_reports_schema_shapes_and_outputs(clf: httpx.Client) -> None:
    meta = clf.get("/v2/models/skqk").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "predictions", "datatype": "BYTES", "shape": [-1]},
                               {"name": "prediction_indices", "datatype": "INT64", "shape": [-1]}]
    assert meta["parameters"]["feature_names"] == list(FEATURES)
    assert meta["parameters"]["class_names"] == list(CLASSES)


@pytest.mark.parametrize("column", [False, True])
def test_v2_per_feature_tensors_and_bytes_output(clf: httpx.Client, column: bool) -> None:
    rows = [ROW, {**ROW, "age": 30, "chol": 150.0}]
    payload = _v2_features(rows, tuple(reversed(FEATURES)), column=column)
    r = clf.post("/v2/models/skqk/infer", json=payload)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    predict = clf.post("/predict", json={"inputs": rows}).json()
    assert outputs["predictions"] == {"name": "predictions", "shape": [2], "datatype": "BYTES",
                                      "data": predict["predictions"]}
    assert outputs["prediction_indices"]["datatype"] == "INT64"
    assert outputs["prediction_indices"]["data"] == predict["prediction_indices"]
    np.testing.assert_allclose(np.array(outputs["logits"]["data"]).reshape(2, 3), predict["outputs"],
                               rtol=1e-6)
    data = [[r[n] for n in FEATURES] for r in rows]
    single = clf.post("/v2/models/skqk/infer", json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [2, 4], "data": data}],
        "outputs": [{"name": "predictions"}]}).json()
    assert single["outputs"] == [outputs["predictions"]]


@pytest.mark.parametrize(("payload", "needle"), [
    (_v2_features([{**ROW, "bmj": 27.4}], ("age", "bmj", "bp", "chol")),
     "inputs: unknown feature 'bmj' (did you mean 'bmi'?)"),
    (_v2_features([ROW], ("age", "bmi", "bp")), "inputs: missing feature 'chol'"),
    ({"inputs": [*_v2_features([ROW], FEATURES)["inputs"],
                 {"name": "age", "datatype": "FP32", "shape": [1], "data": [3]}]},
     "inputs[4].name: feature 'age' is given twice"),
    ({"inputs": [{**t, "shape": [1, 2]} for t in _v2_features([ROW], FEATURES)["inputs"]]},
     "inputs[0].shape: feature tensor 'age' must have shape [N] or [N, 1]"),
    ({"inputs": [*_v2_features([ROW], FEATURES[:3])["inputs"],
                 {"name": "chol", "datatype": "FP32", "shape": [2], "data": [1, 2]}]},
     "inputs[3].shape: 2 rows, but inputs[0] has 1"),
    ({"inputs": [{**t, "data": ["x"]} if t["name"] == "bp" else t
                 for t in _v2_features([ROW], FEATURES)["inputs"]]}, "inputs[2].data[0]: expected a number"),
    ({"inputs": [{**t, "datatype": "INT64"} for t in _v2_features([ROW], FEATURES)["inputs"]]},
     "inputs[0].datatype: only FP32 is supported"),
    ({**_v2_features([ROW], FEATURES), "outputs": [{"name": "probabilities"}]},
     "outputs[0].name: unknown output 'probabilities'; have ['logits', 'predictions', 'prediction_indices']"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]},
     "inputs[0].shape: [1, 3] has 3 features per row; the model takes 4"),
])
def test_v2_names_the_bad_tensor(clf: httpx.Client, payload: dict, needle: str) -> None:
    r = clf.post("/v2/models/skqk/infer", json=payload)
    assert needle in _error(r)
    assert list(r.json()) == ["error"]


# ---- regression ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "targets"), [("reg1", 1), ("reg2", 2)])
def test_regression_predictions_in_target_units(serve: Callable[..., ServerProcess], kind: str,
                                                targets: int) -> None:
    server = serve(kind)
    x = [[3, 2.5, 1990], [1, 0.5, 2020]]
    with server.client() as c:
        body = c.post("/predict", json={"inputs": [x[0], {"rooms": 1, "area": 0.5, "year": 2020}]}).json()
        assert set(body) == {"model_version", "predictions", "outputs"}
        store = _store(server)
        try:
            model, _ = load_model(store, 1)
        finally:
            store.dispose()
        expected = model(torch.tensor(x, dtype=torch.float32)).detach().numpy()
        np.testing.assert_allclose(body["outputs"], expected, rtol=1e-4)
        if targets == 1:
            assert all(isinstance(p, float) for p in body["predictions"])
            np.testing.assert_allclose(body["predictions"], expected[:, 0], rtol=1e-4)
        else:
            np.testing.assert_allclose(body["predictions"], expected, rtol=1e-4)
        meta = c.get("/v2/models/skqk").json()
        assert meta["outputs"] == [{"name": "predictions", "datatype": "FP32", "shape": [-1, targets]}]
        v2 = c.post("/v2/models/skqk/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [2, 3], "data": x}]}).json()
        assert [(o["name"], o["shape"]) for o in v2["outputs"]] == [("predictions", [2, targets])]
        np.testing.assert_allclose(v2["outputs"][0]["data"], expected.reshape(-1), rtol=1e-4)
        r = c.post("/v2/models/skqk/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 3], "data": x[0]}],
            "outputs": [{"name": "logits"}]})
        assert "unknown output 'logits'; have ['predictions']" in _error(r)


def test_regression_ingest_stores_targets(serve: Callable[..., ServerProcess]) -> None:
    for kind, labels, expected in (("reg1", [250.5, [99]], [[250.5], [99.0]]),
                                   ("reg2", [[1.5, -2], [3, 4.25]], [[1.5, -2.0], [3.0, 4.25]])):
        server = serve(kind)
        with server.client() as c:
            before = _count(c)
            samples = [{"features": {"rooms": 2, "area": 1.5, "year": 2001}, "label": labels[0]},
                       {"features": [4, 3.0, 1975], "label": labels[1]}]
            r = c.post("/ingest", json={"samples": samples})
            assert r.status_code == 200, r.text
            assert _count(c) == before + 2
        store = _store(server)
        try:
            stored = store.load_samples(3, n_targets=len(expected[0]))
        finally:
            store.dispose()
        np.testing.assert_allclose(stored.y[-2:], expected)
        np.testing.assert_allclose(stored.x[-2:], [[2, 1.5, 2001], [4, 3.0, 1975]])


@pytest.mark.parametrize(("kind", "label", "needle"), [
    ("reg1", "12.5", "samples[0].label: expected a number (regression target ['price']), got string"),
    ("reg1", True, "samples[0].label: expected a number"),
    ("reg1", None, "samples[0].label: expected a number"),
    ("reg1", [1, 2], "samples[0].label: expected 1 target value ['price'], got 2"),
    ("reg1", 1e39, "samples[0].label: value is out of float32 range"),
    ("reg2", 3.0, "samples[0].label: this model predicts 2 targets ['lat', 'lon']"),
    ("reg2", [1.0], "samples[0].label: expected 2 target values ['lat', 'lon'], got 1"),
    ("reg2", [1.0, "2"], "samples[0].label[1]: expected a number, got string"),
    ("reg2", [1.0, False], "samples[0].label[1]: expected a number, got boolean"),
])
def test_regression_ingest_refuses_bad_targets(serve: Callable[..., ServerProcess], kind: str, label: Any,
                                               needle: str) -> None:
    with _client(serve, kind) as c:
        before = _count(c)
        r = c.post("/ingest", json={"samples": [{"features": [1, 2, 3], "label": label}]})
        assert needle in _error(r)
        assert _count(c) == before


def test_regression_ingest_refuses_nan_targets(serve: Callable[..., ServerProcess]) -> None:
    with _client(serve, "reg2") as c:
        before = _count(c)
        body = '{"samples": [{"features": [1, 2, 3], "label": [1.0, NaN]}]}'
        r = c.post("/ingest", content=body, headers={"Content-Type": "application/json"})
        assert "samples[0].label[1]: value is not a finite number" in _error(r)
        assert _count(c) == before


# ---- old-style versions, /models, counts ----------------------------------------------------------------
def test_version_without_schema_answers_with_int_predictions(serve: Callable[..., ServerProcess]) -> None:
    """A CNN version stored without a schema: features f0..f15, integer classes, shape [1, 4, 4]."""
    with _client(serve, "old-cnn") as c:
        meta = c.get("/v2/models/skqk").json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 4, 4]}]
        assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
            ("logits", "FP32", [-1, 3]), ("predictions", "INT64", [-1]),
            ("prediction_indices", "INT64", [-1])]
        x = np.random.default_rng(0).random((2, 1, 4, 4)).astype(np.float32)
        nested = c.post("/v2/models/skqk/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [2, 1, 4, 4], "data": x.tolist()}]})
        assert nested.status_code == 200, nested.text
        flat = c.post("/v2/models/skqk/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [2, 16], "data": x.reshape(-1).tolist()}]}).json()
        assert nested.json()["outputs"] == flat["outputs"]
        rows = x.reshape(2, 16).tolist()
        predict = c.post("/predict", json={"inputs": [rows[0], {f"f{i}": v for i, v in enumerate(rows[1])}]})
        body = predict.json()
        assert body["predictions"] == body["prediction_indices"]
        assert all(isinstance(p, int) for p in body["predictions"])
        outputs = {o["name"]: o for o in flat["outputs"]}
        assert outputs["predictions"]["data"] == body["predictions"]
        r = c.post("/v2/models/skqk/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 2, 4, 4], "data": [0.0] * 32}]})
        assert "the model takes 16 (shape [N, 16] or [N, 1, 4, 4]" in _error(r)
        assert "classes are integers 0..2" in _error(c.post("/ingest", json={
            "samples": [{"features": rows[0], "label": "2"}]}))
        r = c.post("/ingest", json={"samples": [{"features": {f"f{i}": 0.0 for i in range(16)}, "label": 2}]})
        assert r.status_code == 200, r.text
        (entry,) = c.get("/models").json()
        assert entry["schema"]["feature_names"] == [f"f{i}" for i in range(16)]
        assert entry["schema"]["input_shape"] == [1, 4, 4]
        assert entry["schema"]["class_names"] is None and entry["schema"]["normalization"] == {"type": "none"}


def test_models_listing_carries_each_versions_schema(clf: httpx.Client) -> None:
    (entry,) = clf.get("/models").json()
    assert {"version", "parent", "mode", "created_at", "metrics", "active"} <= set(entry)
    assert entry["architecture"] == "mlp:4-16-3"
    schema = entry["schema"]
    assert schema["feature_names"] == list(FEATURES) and schema["class_names"] == list(CLASSES)
    assert schema["task"] == "classification" and schema["input_shape"] == [4]
    assert schema["ranges"] == {"min": list(LOW), "max": list(HIGH)}
    assert schema["normalization"]["type"] == "standard"
    assert schema["normalization"]["mean"] == [60.0, 25.0, 120.0, 200.0]


def test_samples_count_and_gauge(clf: httpx.Client) -> None:
    r = clf.get("/samples/count")
    assert r.status_code == 200 and set(r.json()) == {"total"}
    total = r.json()["total"]
    assert clf.post("/ingest", json={"samples": [{"features": ROW, "label": "benign"}]}).status_code == 200
    assert _count(clf) == total + 1
    assert _metric(clf, "skqk_samples_total") == total + 1
    assert clf.post("/samples/count").status_code == 405


def test_fast_path_and_routes_agree_on_named_rows(serve: Callable[..., ServerProcess]) -> None:
    cases: list[tuple[str, object]] = [
        ("/predict", {"inputs": [ROW, LIST_ROW]}),
        ("/predict", {"inputs": [{**ROW, "bmj": 1}]}),
        ("/predict", {"inputs": [OUT_OF_RANGE]}),
        ("/v2/models/skqk/infer", {**_v2_features([ROW], FEATURES), "id": "a"}),
        ("/v2/models/skqk/infer", _v2_features([ROW], FEATURES[1:])),
    ]
    with serve("clf").client() as fast, _client(serve, "clf", **SLOW_OFF) as slow:
        for path, payload in cases:
            answers = [c.post(path, content=json.dumps(payload), headers={"Content-Type": "application/json"})
                       for c in (fast, slow)]
            assert answers[0].status_code == answers[1].status_code, (path, payload)
            assert answers[0].json() == answers[1].json(), (path, payload)
