"""A small classifier with feature and class names for the v2 client tests (no training needed).

Class names make ``predictions`` a BYTES tensor; feature names allow one tensor per feature.
"""

from __future__ import annotations

from pathlib import Path

from app.core.features import FeatureSchema
from app.core.network import DecoupledModel, ReLUNet
from app.core.spec import mlp
from app.serving.models import register_model
from app.storage import open_store
from tests.helpers.server import ServerProcess, fast_env

FEATURES = ("age", "bmi", "bp", "chol")
CLASSES = ("benign", "malignant", "unknown")
LOW, HIGH = (0.0, 10.0, 50.0, 100.0), (120.0, 60.0, 200.0, 400.0)
ROWS = [[61.0, 27.4, 130.0, 210.5], [30.0, 22.0, 110.0, 150.0], [75.0, 35.5, 180.0, 390.0],
        [45.0, 18.25, 95.0, 120.0], [5.0, 55.0, 60.0, 300.0]]  # all inside the ranges


def make_classifier_store(data_dir: Path) -> Path:
    spec = mlp([4, 16, 3]).with_affines(input_norm=((60.0, 25.0, 120.0, 200.0), (15.0, 5.0, 20.0, 40.0)))
    schema = FeatureSchema(feature_names=FEATURES, input_shape=(4,), num_classes=3, class_names=CLASSES,
                           label_column="diagnosis", range_min=LOW, range_max=HIGH)
    store = open_store(f"sqlite:///{data_dir}/skqk.db")
    model = DecoupledModel.from_net(ReLUNet(spec, seed=0))
    version = register_model(store, model, "full", None, {}, data_watermark=None, schema=schema)
    store.activate(version, actor="test", reason="test")
    store.dispose()
    return data_dir


def start_classifier_server(data_dir: Path, fast_path: bool) -> ServerProcess:
    make_classifier_store(data_dir)
    env = fast_env(data_dir, SKQK_FAST_PATH=str(fast_path).lower())
    return ServerProcess(data_dir, env).start()
