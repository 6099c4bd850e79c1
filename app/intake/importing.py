"""``skqk import MODEL``: register a network trained elsewhere as a new version.

The network (ONNX, a ``torch.export`` program, or this project's safetensors + JSON manifest)
becomes an :class:`ArchSpec` + weights; its selector and estimator both start as the imported
weights, so the decoupled pair computes exactly the source model. That is proven before
anything is stored: the source model (onnxruntime / the exported program) and the pair run on a
check batch (``--data`` rows, else seeded random inputs in the input shape) and the import is
refused when they differ by more than 1e-4 × max(1, max |source output|). No normalisation is
added (outputs must match the source model's); ``--data`` rows are stored as the old samples
later retrains use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.features import FeatureSchema, SchemaError
from app.core.network import DecoupledModel, ReLUNet
from app.core.splits import split_masks
from app.core.tasks import evaluate_task, holdout_metrics
from app.intake.networks import ImportedNetwork, UnsupportedModel
from app.intake.training_table import TrainingTable, table_from_file
from app.serving.models import register_model
from app.settings import Settings
from app.storage import Store

log = logging.getLogger("skqk.import")

TOLERANCE = 1e-4  # max |pair − source| ≤ TOLERANCE × max(1, max |source|)
CHECK_ROWS = 256


class ImportMismatch(ValueError):
    """The decoupled pair does not reproduce the source model on the check batch."""


@dataclass
class ImportResult:
    version: int
    activated: bool
    max_abs_diff: float
    notes: list[str]
    n_samples_stored: int
    metrics: dict[str, Any]


Runner = Callable[[np.ndarray], np.ndarray]


def load_network(path: Path, input_shape: tuple[int, ...] | None = None, strip_softmax: bool = False
                 ) -> tuple[ImportedNetwork, Runner]:
    """The network and a function that runs the *source* model (the reference for the check).

    With ``strip_softmax`` the reference is the source's logits where the file lets us read them
    (ONNX: the softmax's input made the graph output), else the source's log-probabilities
    (``.pt2``), which the check compares with the log-softmax of the import's logits.
    """
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from app.intake.networks.onnx_import import import_onnx, logits_model, run_onnx

        imported = import_onnx(path, input_shape, strip_softmax)
        if imported.stripped_softmax:
            import onnx

            model = onnx.load(str(path))
            head = next(n for n in model.graph.node if n.op_type == imported.stripped_softmax)
            cut = logits_model(model, head)
            return imported, lambda x: run_onnx(cut, x)
        return imported, lambda x: run_onnx(path, x)
    if suffix == ".pt2":
        from app.intake.networks.torch_export_import import import_pt2, run_pt2

        imported = import_pt2(path, input_shape, strip_softmax)
        if imported.stripped_softmax == "Softmax":
            return imported, lambda x: np.log(np.maximum(run_pt2(path, x), 1e-30))
        return imported, lambda x: run_pt2(path, x)
    if suffix in (".safetensors", ".json"):
        return _load_checkpoint(path)
    raise UnsupportedModel(f"{path.name}: unknown model format {suffix!r}; use .onnx, .pt2 "
                           "(torch.export.save) or .safetensors with its .json manifest")


def _load_checkpoint(path: Path) -> tuple[ImportedNetwork, Runner]:
    from app.core.checkpoint import load_checkpoint

    net, _manifest = load_checkpoint(path.parent, path.stem)
    imported = ImportedNetwork(net.spec, net.state_dict(), "safetensors", [])

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net.eval()(torch.from_numpy(x)).numpy()

    return imported, run


def import_model(store: Store, settings: Settings, path: Path, data: Path | None = None,
                 label_columns: list[str] | None = None, features: list[str] | None = None,
                 task: str = "classification", classes: list[str] | None = None,
                 input_shape: tuple[int, ...] | None = None, activate: bool = False,
                 strip_softmax: bool = False) -> ImportResult:
    started = time.perf_counter()
    imported, run_source = load_network(Path(path), input_shape, strip_softmax)
    net = imported.build()
    spec = net.spec
    classes = classes or imported.class_names  # labels the file carries (skl2onnx)
    table = _data_table(data, label_columns, features, task, classes) if data is not None else None
    schema = _schema(imported, table, task, classes)
    if table is not None:  # /explain's default reference: the mean of the rows it came with
        schema = schema.with_reference_from(table.x)
    model = DecoupledModel.from_net(net)
    log_space = imported.source_format == "pt2" and imported.stripped_softmax is not None
    diff = check_against_source(model, run_source, spec.input_dim, table, log_space)
    batch_ids: list[int] = []
    if table is not None:  # the data the model was trained on: the old samples of later retrains
        from app.intake.bootstrap import store_table

        table.schema = schema
        batch_ids = store_table(store, table)
    metrics = {"source": Path(path).name, "format": imported.source_format, "import_max_abs_diff": diff,
               "import_notes": imported.notes, "task": schema.task, "arch": spec.name,
               **({"stripped_softmax": imported.stripped_softmax} if imported.stripped_softmax else {}),
               **_holdout_scores(store, settings, model, schema, batch_ids)}
    watermark = store.max_sample_id() or None
    version = register_model(store, model, mode="import", parent=None, metrics=metrics,
                             data_watermark=watermark, schema=schema)
    first = store.active_version() is None
    if first or activate:
        store.activate(version, actor="import", reason=f"import of {Path(path).name}")
    metrics["import_seconds"] = time.perf_counter() - started
    log.info("imported %s as version %d (max |diff| %.3g)", path, version, diff)
    stored = len(table.x) if table is not None else 0
    return ImportResult(version, first or activate, diff, imported.notes, stored, metrics)


def _data_table(data: Path, label_columns: list[str] | None, features: list[str] | None, task: str,
                classes: list[str] | None) -> TrainingTable:
    if not label_columns:
        raise SchemaError("--data needs --label-column")
    return table_from_file(data, label_columns, features, task, classes, normalize=False)


def _schema(imported: ImportedNetwork, table: TrainingTable | None, task: str,
            classes: list[str] | None) -> FeatureSchema:
    """Names from the data file (else f0…), the network's input shape, its number of outputs."""
    spec = imported.spec
    k = spec.num_outputs
    names = (tuple(table.schema.feature_names) if table is not None
             else tuple(f"f{i}" for i in range(spec.input_dim)))
    if len(names) != spec.input_dim:
        raise SchemaError(f"the data has {len(names)} features; the network takes {spec.input_dim} "
                          f"(input shape {list(spec.input_shape)})")
    label_column = table.schema.label_column if table is not None else None
    if task == "regression":
        targets = (table.schema.target_names if table is not None and len(table.schema.target_names) == k
                   else tuple(f"y{i}" for i in range(k)) if k > 1 else ("y",))
        return FeatureSchema(names, tuple(spec.input_shape), "regression", target_names=targets,
                             label_column=label_column, source=imported.source_format)
    class_names = tuple(classes) if classes else (table.schema.class_names if table is not None else None)
    if class_names is not None and len(class_names) != k:
        raise SchemaError(f"{len(class_names)} class names for a network with {k} outputs; "
                          f"pass --classes with {k} names in output order")
    if table is not None and int(table.y.max()) >= k:
        raise SchemaError(f"the data has label index {int(table.y.max())}; the network has {k} outputs")
    return FeatureSchema(names, tuple(spec.input_shape), "classification", num_classes=k,
                         class_names=class_names, label_column=label_column, source=imported.source_format)


def check_against_source(model: DecoupledModel, run_source: Runner, input_dim: int,
                         table: TrainingTable | None, log_space: bool = False) -> float:
    """Max |pair − source| on the check batch; raises ImportMismatch beyond the tolerance."""
    if table is not None:
        x = table.x[:CHECK_ROWS].astype(np.float32)
    else:
        x = np.random.default_rng(0).standard_normal((CHECK_ROWS, input_dim)).astype(np.float32)
    reference = np.asarray(run_source(x), dtype=np.float32).reshape(x.shape[0], -1)
    with torch.no_grad():
        ours_t = model.eval()(torch.from_numpy(x))
        ours = (torch.log_softmax(ours_t, dim=1) if log_space else ours_t).numpy()
    if ours.shape != reference.shape:
        raise ImportMismatch(f"the source model gives outputs of shape {reference.shape}, the import "
                             f"{ours.shape}")
    diff = float(np.abs(ours - reference).max())
    bound = TOLERANCE * max(1.0, float(np.abs(reference).max()))
    if not diff <= bound:
        raise ImportMismatch(f"the imported network differs from the source by {diff:.3g} (> {bound:.3g}) "
                             "on the check batch; nothing was registered")
    return diff


def _holdout_scores(store: Store, settings: Settings, model: DecoupledModel, schema: FeatureSchema,
                    batch_ids: list[int]) -> dict[str, float]:
    """Holdout metrics of the imported model on the stored data (the gate's reference)."""
    if not batch_ids:
        return {}
    rows = store.load_samples(schema.input_dim, batch_id=batch_ids,
                              n_targets=schema.num_outputs if schema.is_regression else None)
    hold = split_masks(rows.ids, settings.holdout_modulo).holdout
    if not hold.any():
        return {}
    x, y = torch.from_numpy(rows.x[hold]), torch.from_numpy(rows.y[hold])
    net: ReLUNet = model.estimator.net
    with torch.no_grad():
        raw = evaluate_task(lambda xb, _r: model(xb), x, y, schema.task, net.to_layer_space)
    return holdout_metrics(raw, schema.task)
