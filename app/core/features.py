"""The feature schema of a model version: what its inputs and outputs mean.

A schema travels with every version (``model_versions.feature_schema``): feature names in
input order, the input shape, the task, class names (classification) or target names
(regression), the label column of the data file it came from, and optional per-feature
value ranges. The input normalisation is not here: it is part of the network itself
(:class:`app.core.spec.ArchSpec.input_norm`), so clients always send raw values.

Pure numpy; the HTTP layer turns :class:`SchemaError` into a 422 and the file importer into
a message naming the row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from app.core.encoding import Encoding

TASKS = ("classification", "regression")
RANGE_MARGIN = 0.10  # learnt ranges widen each feature's [min, max] by 10 % of its span per side


class SchemaError(ValueError):
    """A value does not fit the schema; the message names the field."""


@dataclass(frozen=True)
class FeatureSchema:
    feature_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    task: str = "classification"
    num_classes: int = 0  # classification: number of classes
    class_names: tuple[str, ...] | None = None  # classification: label names (None: integers)
    target_names: tuple[str, ...] = ()  # regression: one per output
    label_column: str | None = None
    range_min: tuple[float, ...] | None = None
    range_max: tuple[float, ...] | None = None
    source: str | None = None
    # the default explanation reference (app.core.explain): the training rows' mean, stored with
    # the version at registration; None for versions stored before it existed
    reference: tuple[float, ...] | None = None
    # a table's column types (app.core.encoding): feature_names are then the encoded inputs
    encoding: Encoding | None = None
    _index: dict[str, int] = field(init=False, compare=False, repr=False)
    _class_index: dict[str, int] = field(init=False, compare=False, repr=False)
    _bounds: tuple[np.ndarray, np.ndarray] | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SchemaError(f"task must be one of {TASKS}, got {self.task!r}")
        if len(self.feature_names) != math.prod(self.input_shape):
            raise SchemaError(f"{len(self.feature_names)} feature names for input shape "
                              f"{list(self.input_shape)}")
        if self.encoding is not None and list(self.feature_names) != self.encoding.input_names():
            raise SchemaError("feature names must be the encoding's input names")
        if len(set(self.feature_names)) != len(self.feature_names):
            raise SchemaError("feature names must be unique")
        if self.task == "classification":
            if self.class_names is not None and len(self.class_names) != self.num_classes:
                raise SchemaError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        elif not self.target_names:
            raise SchemaError("a regression schema needs at least one target name")
        if self.reference is not None and (len(self.reference) != len(self.feature_names)
                                           or not all(map(math.isfinite, self.reference))):
            raise SchemaError(f"reference needs {len(self.feature_names)} finite values")
        # lookups built once (frozen dataclass: set through object.__setattr__)
        object.__setattr__(self, "_index", {name: i for i, name in enumerate(self.columns)})
        object.__setattr__(self, "_class_index", {name: i for i, name in enumerate(self.class_names or ())})
        bounds = ((np.asarray(self.range_min, dtype=np.float64), np.asarray(self.range_max, dtype=np.float64))
                  if self.has_ranges else None)
        object.__setattr__(self, "_bounds", bounds)

    # ---- facts -------------------------------------------------------------------------
    @property
    def input_dim(self) -> int:
        return len(self.feature_names)

    @property
    def num_outputs(self) -> int:
        return self.num_classes if self.task == "classification" else len(self.target_names)

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"

    @property
    def columns(self) -> tuple[str, ...]:
        """The names clients send values for: the table's columns, or the feature names."""
        return self.encoding.names if self.encoding is not None else self.feature_names

    def encoded_feature_groups(self) -> list[str]:
        """For each network input (in order), the name of the column it encodes."""
        return self.encoding.groups() if self.encoding is not None else list(self.feature_names)

    @property
    def has_ranges(self) -> bool:
        return self.range_min is not None and self.range_max is not None

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"feature_names": list(self.feature_names),
                             "input_shape": list(self.input_shape), "task": self.task,
                             "label_column": self.label_column, "source": self.source}
        if self.task == "classification":
            d["num_classes"] = self.num_classes
            d["class_names"] = list(self.class_names) if self.class_names is not None else None
        else:
            d["target_names"] = list(self.target_names)
        d["ranges"] = ({"min": list(self.range_min), "max": list(self.range_max)}  # type: ignore[arg-type]
                       if self.has_ranges else None)
        if self.reference is not None:  # absent key: schemas stored before it read back unchanged
            d["reference"] = {"type": "training_mean", "values": list(self.reference)}
        if self.encoding is not None:  # absent key: numeric schemas stay as they were
            d["columns"] = self.encoding.to_list()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSchema:
        ranges = d.get("ranges") or None
        classes = d.get("class_names")
        reference = (d.get("reference") or {}).get("values")
        return cls(feature_names=tuple(str(n) for n in d["feature_names"]),
                   input_shape=tuple(int(v) for v in d["input_shape"]), task=d.get("task", "classification"),
                   num_classes=int(d.get("num_classes") or 0),
                   class_names=tuple(str(c) for c in classes) if classes is not None else None,
                   target_names=tuple(str(t) for t in d.get("target_names") or ()),
                   label_column=d.get("label_column"),
                   range_min=tuple(float(v) for v in ranges["min"]) if ranges else None,
                   range_max=tuple(float(v) for v in ranges["max"]) if ranges else None,
                   source=d.get("source"),
                   reference=tuple(float(v) for v in reference) if reference is not None else None,
                   encoding=Encoding.from_list(d["columns"]) if d.get("columns") else None)

    @classmethod
    def default(cls, input_shape: Sequence[int], num_outputs: int, source: str | None = None
                ) -> FeatureSchema:
        """The schema of a version stored before schemas existed: classification, integer
        labels, features named ``f0 … f{D-1}``."""
        dim = math.prod(input_shape)
        return cls(feature_names=tuple(f"f{i}" for i in range(dim)), input_shape=tuple(input_shape),
                   task="classification", num_classes=num_outputs, source=source)

    def with_ranges_from(self, x: np.ndarray, margin: float = RANGE_MARGIN) -> FeatureSchema:
        """Ranges learnt from training rows: [min, max] widened by ``margin`` of the span per side."""
        lo, hi = x.min(axis=0).astype(np.float64), x.max(axis=0).astype(np.float64)
        span = hi - lo
        # a feature constant in training has no span to scale: allow ±max(10 % of |value|, 1)
        pad = np.where(span > 0, span * margin, np.maximum(np.abs(lo) * margin, 1.0))
        return replace(self, range_min=tuple((lo - pad).tolist()), range_max=tuple((hi + pad).tolist()))

    def with_reference_from(self, x: np.ndarray) -> FeatureSchema:
        """The training rows' mean (float64) as the version's default explanation reference."""
        return replace(self, reference=tuple(x.astype(np.float64).mean(axis=0).tolist()))

    # ---- rows ------------------------------------------------------------------------------
    def row_from_object(self, obj: dict[str, Any], where: str) -> list[Any]:
        """A row given as ``{feature name: value}`` → values in schema order."""
        extra = [k for k in obj if k not in self._index]
        if extra:
            raise SchemaError(f"{where}: unknown feature {extra[0]!r}"
                              f"{_suggest(extra[0], self.columns)}")
        if self.encoding is not None:  # a column that had missing values may be left out: missing
            missing = [c.name for c in self.encoding.columns if c.name not in obj and not c.missing]
        else:
            missing = [n for n in self.feature_names if n not in obj]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise SchemaError(f"{where}: missing feature {missing[0]!r}{more}")
        return [obj.get(n) for n in self.columns]

    def out_of_range_rows(self, x: np.ndarray) -> tuple[int, tuple[int, int] | None]:
        """How many rows have a value outside the ranges, and (row, feature index) of the first."""
        if not self.has_ranges:
            return 0, None
        # bounds in the rows' own precision: rounding is monotonic, so a value inside the range
        # stays inside after float32 rounding
        dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
        lo, hi = self._bounds[0].astype(dtype), self._bounds[1].astype(dtype)
        bad = (x < lo) | (x > hi)
        rows = bad.any(axis=1)
        count = int(rows.sum())
        if count == 0:
            return 0, None
        r = int(np.argmax(rows))
        return count, (r, int(np.argmax(bad[r])))

    def out_of_range(self, x: np.ndarray) -> tuple[int, int] | None:
        """(row, feature index) of the first value outside the ranges, or None."""
        return self.out_of_range_rows(x)[1]

    def range_message(self, x: np.ndarray, row: int, col: int) -> str:
        assert self.range_min is not None and self.range_max is not None
        return (f"feature {self.feature_names[col]!r} = {float(x[row, col]):g} is outside its range "
                f"[{self.range_min[col]:g}, {self.range_max[col]:g}]")

    # ---- labels ----------------------------------------------------------------------------
    def label_index(self, value: Any, where: str) -> int:
        """A classification label (class name or integer index) → class index."""
        if isinstance(value, bool):
            raise SchemaError(f"{where}: expected a class name or index, got a boolean")
        if isinstance(value, str):
            if self.class_names is None:
                raise SchemaError(f"{where}: this model's classes are integers 0..{self.num_classes - 1}, "
                                  f"got the string {value!r}")
            idx = self._class_index.get(value)
            if idx is None:
                raise SchemaError(f"{where}: unknown class {value!r}; classes are {list(self.class_names)}")
            return idx
        if isinstance(value, int):
            if not 0 <= value < self.num_classes:
                raise SchemaError(f"{where}: must be in [0, {self.num_classes - 1}], got {value}")
            return value
        raise SchemaError(f"{where}: expected a class name or index, got {type(value).__name__}")

    def class_labels(self, indices: np.ndarray) -> list[Any]:
        """Prediction indices → class names (or the integers when the model has none)."""
        if self.class_names is None:
            return [int(i) for i in indices]
        return [self.class_names[int(i)] for i in indices]


def _suggest(name: str, choices: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
