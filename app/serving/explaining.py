"""Explanations of a served version, without HTTP: what ``/explain`` and ``skqk explain`` share.

Resolves the reference (the training mean stored with the version; versions stored before it:
the normalisation mean, else zero, and the answer says which) and the outputs to explain, runs
``app.core.explain`` and turns its tensors into per-row arrays: contributions grouped by
original feature, intercepts, radii. Bad options raise :class:`ExplainInputError` naming the
field (the API makes it a 422, the CLI an exit code).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.core.explain import Explainer, group_columns
from app.core.features import FeatureSchema, SchemaError
from app.core.network import DecoupledModel
from app.core.spec import ArchSpec

_explainers: weakref.WeakKeyDictionary[DecoupledModel, Explainer] = weakref.WeakKeyDictionary()


class ExplainInputError(ValueError):
    """A reference or an outputs choice that does not fit the version; the message names the field."""


def explainer_of(model: DecoupledModel) -> Explainer:
    """One Explainer per loaded model (its linear-part copies are built once)."""
    found = _explainers.get(model)
    if found is None:
        found = _explainers[model] = Explainer(model)
    return found


def feature_groups(schema: FeatureSchema) -> tuple[list[str], np.ndarray | None]:
    """Names contributions are reported under, and each input column's group (None: identity).

    A table's encoded inputs (one-hot blocks, missing indicators) are mapped back to the column
    they encode, and a block's contributions are summed into that column
    (``app.core.explain.group_columns``).
    """
    if schema.encoding is None:
        return list(schema.feature_names), None
    names = list(schema.columns)
    index = {name: i for i, name in enumerate(names)}
    return names, np.asarray([index[g] for g in schema.encoded_feature_groups()], dtype=np.int64)


def default_reference(schema: FeatureSchema, spec: ArchSpec) -> tuple[np.ndarray, str]:
    if schema.reference is not None:
        return np.asarray(schema.reference, dtype=np.float64), "training_mean"
    if spec.input_norm is not None:  # a version stored before references: its normalisation's mean
        return np.asarray(spec.input_norm[0], dtype=np.float64), "normalization_mean"
    return np.zeros(spec.input_dim), "zero"


def named_reference(value: str, schema: FeatureSchema, spec: ArchSpec, field: str) -> tuple[np.ndarray, str]:
    """``"mean"`` or ``"zero"`` → (r float64 [D], its source)."""
    if value == "mean":
        return default_reference(schema, spec)
    if value == "zero":
        return np.zeros(spec.input_dim), "zero"
    raise ExplainInputError(f'{field}: expected "mean", "zero" or a row, got the string {value!r}')


def resolve_outputs(value: Any, schema: FeatureSchema, field: str) -> np.ndarray | str:
    """Which outputs to explain: "predicted", "all", or one output index (as an array)."""
    if value is None or value == "predicted":
        return "all" if schema.is_regression else "predicted"
    if value == "all":
        return "all"
    if schema.is_regression:
        names = list(schema.target_names)
        if isinstance(value, str) and value in names:
            return np.asarray([names.index(value)])
        if type(value) is int and 0 <= value < len(names):
            return np.asarray([value])
        raise ExplainInputError(f'{field}: expected "all" or a target name {names}, got {value!r}')
    if type(value) not in (str, int):
        raise ExplainInputError(f'{field}: expected "predicted", "all", a class name or index, got '
                                f"{type(value).__name__}")
    try:
        return np.asarray([schema.label_index(value, field)])
    except SchemaError as exc:
        raise ExplainInputError(str(exc)) from None


@dataclass
class Explained:
    version: int
    schema: FeatureSchema
    outputs: np.ndarray  # float32 [N, K] the model's outputs
    predictions: np.ndarray  # int64 [N] argmax (classification)
    chosen: np.ndarray  # int64 [N, K'] the explained outputs
    contributions: np.ndarray  # float64 [N, K', G]
    intercept: np.ndarray  # float64 [N, K']
    active_units: np.ndarray  # int64 [N]
    total_units: int
    radius_l2: np.ndarray  # float64 [N] (inf: unbounded)
    radius_linf: np.ndarray
    reference: np.ndarray  # float64 [D]
    reference_source: str
    names: list[str]

    def output_values(self) -> np.ndarray:
        return np.take_along_axis(self.outputs, self.chosen, axis=1)


def compute(model: DecoupledModel, schema: FeatureSchema, version: int, x: np.ndarray,
            reference: np.ndarray, source: str, which: np.ndarray | str, radius: bool = True) -> Explained:
    """Explain float32 rows ``x`` [N, D] on ``model`` (the version's own device and dtype).

    ``radius=False``: no certified radius (NaN), contributions only, several times cheaper.
    """
    explainer = explainer_of(model)
    weight = model.estimator.net.readout.weight
    # no_grad, not inference_mode: the radius-free path takes one reverse pass per output
    with torch.no_grad():
        ex = explainer.explain(torch.from_numpy(np.ascontiguousarray(x)).to(weight.device, weight.dtype),
                               radius=radius)
    outputs = ex.outputs.float().cpu().numpy()
    jac = ex.jacobian.cpu().double().numpy()  # [N, K, D]
    offset = ex.offset.cpu().double().numpy()
    n, k = outputs.shape
    predictions = outputs.argmax(1)
    if isinstance(which, str):
        chosen = predictions[:, None] if which == "predicted" else np.broadcast_to(np.arange(k), (n, k))
    else:
        chosen = np.broadcast_to(which, (n, len(which)))
    chosen = np.ascontiguousarray(chosen)
    jac = np.take_along_axis(jac, chosen[:, :, None], axis=1)  # [N, K', D]
    # float64 on the host: the identity then only carries the float32 error of A and c
    contrib = jac * (x.astype(np.float64) - reference)[:, None, :]
    intercept = jac @ reference + np.take_along_axis(offset, chosen, axis=1)
    names, groups = feature_groups(schema)
    if groups is not None:
        contrib = group_columns(torch.from_numpy(contrib), torch.from_numpy(groups), len(names)).numpy()
    return Explained(version, schema, outputs, predictions, chosen, contrib, intercept,
                     ex.active_units.cpu().numpy(), explainer.total_units,
                     ex.radius_l2.cpu().double().numpy(), ex.radius_linf.cpu().double().numpy(),
                     reference, source, names)
