"""Rows to start a model from, with what they mean: a built-in data set or a user's file.

A :class:`TrainingTable` is the input of :func:`app.intake.bootstrap.bootstrap_table`:
features, encoded labels (class indices or float targets) and the feature schema (names,
input shape, task, classes). Reading a file needs the ``files`` extra (pyarrow) for CSV and
Parquet; NPZ needs only numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.core.encoding import Encoding, raw_json_rows
from app.core.features import TASKS, FeatureSchema, SchemaError


@dataclass
class TrainingTable:
    x: np.ndarray  # float32 [N, D]
    y: np.ndarray  # int64 [N] class indices, or float32 [N, T] regression targets
    schema: FeatureSchema  # without ranges: those are learnt from the training rows
    source: str  # names the data in idempotency keys and promotion reasons
    normalize: bool  # learn per-feature mean/std at init (part of the model)
    raw: list[str] | None = None  # tables with column types: each row as it came (JSON), stored too

    @property
    def task(self) -> str:
        return self.schema.task


def table_from_dataset(name: str, seed: int = 0, synthetic_n: int = 20_000) -> TrainingTable:
    """A built-in data set (digits, mnist5k, synthetic): integer classes, values as shipped."""
    from app.core.data import Split, load_dataset

    data = load_dataset(name, seed=seed, synthetic_n=synthetic_n)
    everything = Split.concat([data.train, data.val, data.test])
    schema = FeatureSchema.default((data.input_dim,), data.num_classes, source=name)
    return TrainingTable(everything.x.numpy(), everything.y.numpy(), schema, name, normalize=False)


def table_from_file(path: Path, label_columns: list[str], features: list[str] | None = None,
                    task: str = "classification", classes: list[str] | None = None,
                    normalize: bool = True, types: ColumnTypes | None = None) -> TrainingTable:
    """A user's CSV/Parquet/NPZ file; raises ``DataFileError``/``SchemaError`` naming the problem.

    CSV/Parquet columns get types (numeric, boolean, categorical), inferred or as ``types``
    says; a table of numeric columns without missing values stays a plain numeric schema.
    """
    from app.intake.files import DataFileError, detect_format, read_table

    if task not in TASKS:
        raise SchemaError(f"--task must be one of {TASKS}, got {task!r}")
    kind = "float" if task == "regression" else "class"
    if task == "classification" and len(label_columns) > 1:
        raise SchemaError("classification takes one label column; several are for "
                          "multi-output regression")
    types = types or ColumnTypes()
    source = f"file:{Path(path).name}"
    label_column = ",".join(label_columns) if label_columns else None
    encoding = raw = None
    if detect_format(path) != "npz":
        encoding, x, raw, labels, names = _typed_table(path, label_columns, features, kind, types)
    if encoding is None:
        x, labels, names = read_table(path, label_columns, _kept(path, label_columns, features, types),
                                      label_kind=kind)
    if x.shape[0] == 0:
        raise DataFileError(f"{path}: no data rows")
    input_shape = (encoding.width,) if encoding else _input_shape(path, detect_format(path), x.shape[1])
    if task == "regression":
        y = np.asarray(labels, dtype=np.float32).reshape(x.shape[0], -1)
        targets = (tuple(label_columns) if label_columns and len(label_columns) == y.shape[1]
                   else tuple(f"y{i}" for i in range(y.shape[1])) if y.shape[1] > 1 else ("y",))
        schema = FeatureSchema(tuple(names), input_shape, "regression", target_names=targets,
                               label_column=label_column, source=source, encoding=encoding)
        return TrainingTable(x, y, schema, source, normalize, raw)
    y, class_names = encode_classes(labels, classes)
    schema = FeatureSchema(tuple(names), input_shape, "classification",
                           num_classes=_num_classes(y, class_names), class_names=class_names,
                           label_column=label_column, source=source, encoding=encoding)
    return TrainingTable(x, y, schema, source, normalize, raw)


@dataclass(frozen=True)
class ColumnTypes:
    """The user's say on column types (``--categorical``, ``--numeric``, ``--drop``)."""

    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()


def _kept(path: Path, labels: list[str], features: list[str] | None, types: ColumnTypes) -> list[str] | None:
    if not types.drop:
        return features
    from app.intake.files import file_columns

    cols = features if features is not None else [c for c in (file_columns(path) or []) if c not in labels]
    return [c for c in cols if c not in types.drop]


def _typed_table(path: Path, labels: list[str], features: list[str] | None, kind: str, types: ColumnTypes
                 ) -> tuple[Encoding | None, np.ndarray, list[str] | None, np.ndarray, list[str]]:
    """Read the file's columns, give each a type, fit the encoding and encode. No encoding
    (None) when every column is numeric without missing values: the plain schema of before."""
    from app.intake.files import DataFileError, read_columns
    from app.intake.files.typed import has_missing, infer_kind, parse_arrow

    features = _kept(path, labels, features, types)
    names, cols, y = read_columns(path, labels, features, label_kind=kind)
    for flag, listed in (("--categorical", types.categorical), ("--numeric", types.numeric),
                         ("--drop", types.drop)):
        for c in listed:
            if c not in names and not (flag == "--drop"):
                raise DataFileError(f"{flag}: no such feature column", column=c)
    both = set(types.categorical) & set(types.numeric)
    if both:
        raise DataFileError("is named in both --categorical and --numeric", column=sorted(both)[0])
    kinds = ["categorical" if n in types.categorical else "numeric" if n in types.numeric else infer_kind(c)
             for n, c in zip(names, cols, strict=True)]
    if all(k == "numeric" for k in kinds) and not types.numeric and not any(has_missing(c) for c in cols):
        return None, np.empty((0, 0), np.float32), None, y, names
    from app.intake.files.base import BadValue

    parsed = []
    for j, (n, k, c) in enumerate(zip(names, kinds, cols, strict=True)):
        try:
            parsed.append(parse_arrow(c, k, n, j))
        except BadValue as b:
            raise b.at(1) from None
    encoding = Encoding.fit(names, kinds, parsed)
    x, _ = encoding.encode(parsed)
    return encoding, x, raw_json_rows(kinds, parsed), y, encoding.input_names()


def _input_shape(path: Path, fmt: str, width: int) -> tuple[int, ...]:
    """NPZ keeps its per-sample shape (e.g. [1, 28, 28]); tables are flat rows."""
    if fmt != "npz":
        return (width,)
    from app.intake.files.npz_reader import npz_sample_shape

    per_sample = npz_sample_shape(path)
    return per_sample if per_sample and math.prod(per_sample) == width else (width,)


def encode_classes(labels: np.ndarray, classes: list[str] | None
                   ) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Raw labels → class indices, and the class names (None: the labels are the indices)."""
    if labels.dtype.kind in "iu":
        y = labels.astype(np.int64)
        if (y < 0).any():
            row = int(np.argmax(y < 0)) + 1
            raise SchemaError(f"row {row}: integer class labels must be ≥ 0, got {int(y[row - 1])}")
        if classes is not None and y.max() >= len(classes):
            row = int(np.argmax(y >= len(classes))) + 1
            raise SchemaError(f"row {row}: label {int(y[row - 1])} has no name in --classes "
                              f"({len(classes)} given)")
        return y, tuple(classes) if classes is not None else None
    text = labels.astype(str)
    names = list(classes) if classes is not None else sorted(set(text.tolist()))
    index = {name: i for i, name in enumerate(names)}
    y = np.fromiter((index.get(v, -1) for v in text), dtype=np.int64, count=len(text))
    if (y < 0).any():
        row = int(np.argmax(y < 0)) + 1
        raise SchemaError(f"row {row}: unknown class {str(text[row - 1])!r}; --classes lists {names}")
    return y, tuple(names)


def _num_classes(y: np.ndarray, class_names: tuple[str, ...] | None) -> int:
    n = len(class_names) if class_names is not None else int(y.max()) + 1
    if n < 2:
        raise SchemaError(f"classification needs at least 2 classes; the labels have {n}")
    return n
