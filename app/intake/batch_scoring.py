"""``skqk predict FILE -o OUT``: score a CSV/Parquet/NPZ file with a stored version, in chunks.

The rows go through the same steps as ``/predict``: the version's schema (column types and
encoding, or plain numbers), then the same loaded, verified forward the server runs
(:class:`app.serving.holder.ModelHolder`), argmax for classes. Memory stays at about one chunk
(read, encoded, scored, written, dropped). The output holds the ``--keep`` columns as read,
then the predictions (class name and index, or one column per regression target), then the
raw outputs if asked (``output_<class or target>``). Unknown categories are scored as on
``/predict`` under ``SKQK_UNKNOWN_CATEGORY=ignore`` (none of the known) and counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from app.core.features import FeatureSchema
from app.storage import Store


class ScoringError(ValueError):
    """The file or the output cannot be scored / written; says why."""


@dataclass
class ScoreProgress:
    version: int
    rows: int = 0
    chunks: int = 0
    bytes_read: int | None = None
    total_rows: int | None = None
    started: float = field(default_factory=time.perf_counter)
    forward_s: float = 0.0  # time in the model's forward alone (the in-process ceiling)
    unknown: dict[str, int] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


def output_format(out: Path) -> str:
    name = out.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    raise ScoringError(f"-o {out.name}: the output must end in .parquet or .csv")


def prediction_columns(schema: FeatureSchema, outputs: np.ndarray, with_outputs: bool) -> dict[str, Any]:
    """The answer of one chunk as columns (the same values /predict answers)."""
    cols: dict[str, Any] = {}
    if schema.is_regression:
        names = list(schema.target_names)
        if len(names) == 1:
            cols["prediction"] = pa.array(outputs[:, 0], pa.float32())
        else:
            for j, n in enumerate(names):
                cols[f"prediction_{n}"] = pa.array(outputs[:, j], pa.float32())
        return cols
    idx = outputs.argmax(axis=1)
    cols["prediction"] = (pa.array(schema.class_labels(idx)) if schema.class_names is not None
                          else pa.array(idx, pa.int64()))
    cols["prediction_index"] = pa.array(idx, pa.int64())
    if with_outputs:
        names = schema.class_names or tuple(str(i) for i in range(outputs.shape[1]))
        for j, n in enumerate(names):
            cols[f"output_{n}"] = pa.array(outputs[:, j], pa.float32())
    return cols


class _Writer:
    def __init__(self, out: Path, fmt: str) -> None:
        self.out, self.fmt, self.sink = out, fmt, None

    def write(self, table: pa.Table) -> None:
        if self.sink is None:
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                self.sink = pq.ParquetWriter(self.out, table.schema)
            else:
                import pyarrow.csv as pacsv

                self.sink = pacsv.CSVWriter(self.out, table.schema)
        self.sink.write_table(table)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


def score_file(store: Store, path: Path, out: Path, version: int | None = None, keep: list[str] | None = None,
               with_outputs: bool = False, chunk_rows: int = 50_000, device: str = "cpu",
               on_chunk: Callable[[ScoreProgress], None] | None = None) -> ScoreProgress:
    """Score ``path`` with ``version`` (default: the active one) into ``out``; raises
    ScoringError / DataFileError naming the problem. ``out`` is written through a temporary
    name and renamed at the end, so a failed run leaves no half-written output."""
    from app.intake.files import DataFileError, detect_format, total_rows
    from app.intake.files.readers import iter_scoring_chunks
    from app.serving.holder import ModelHolder

    fmt_out = output_format(out)
    v = version if version is not None else store.active_version()
    if v is None:
        raise ScoringError("the store has no active version: run `skqk init` first, or give --version")
    loaded = ModelHolder(store, device=device, warmup_batch_sizes=(1,)).load(v)
    schema = loaded.schema
    fmt = detect_format(path)
    features = None if fmt == "npz" else list(schema.columns)
    if fmt == "npz" and schema.encoding is not None:
        raise ScoringError("this version's schema has column types; NPZ holds numbers only: "
                           "use CSV or Parquet")
    progress = ScoreProgress(version=v, total_rows=total_rows(path))
    tmp = out.with_name(out.name + ".partial")
    writer = _Writer(tmp, fmt_out)
    try:
        for chunk in iter_scoring_chunks(path, features, schema.encoding, keep or [], chunk_rows):
            x = np.ascontiguousarray(chunk.x, dtype=np.float32).reshape(chunk.x.shape[0], -1)
            if x.shape[1] != loaded.input_dim:
                raise ScoringError(f"{x.shape[1]} features per row; version {v} takes {loaded.input_dim}")
            _count_unknown(chunk, progress)  # what /predict would count (ignore mode)
            t0 = time.perf_counter()
            outputs = loaded.infer(x)
            progress.forward_s += time.perf_counter() - t0
            cols: dict[str, Any] = {}
            if chunk.kept is not None:
                cols.update({n: chunk.kept.column(n) for n in chunk.kept.column_names})
            clash = [n for n in prediction_columns(schema, outputs[:0], with_outputs) if n in cols]
            if clash:
                raise ScoringError(f"--keep {clash[0]!r}: the output has a column of that name")
            cols.update(prediction_columns(schema, outputs, with_outputs))
            writer.write(pa.table(cols))
            progress.rows += x.shape[0]
            progress.chunks += 1
            progress.bytes_read = chunk.bytes_read
            if on_chunk is not None:
                on_chunk(progress)
        if writer.sink is None:  # an empty file still gets its (empty) output
            raise DataFileError(f"{path.name}: no data rows")
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    tmp.replace(out)
    return progress


def _count_unknown(chunk: Any, progress: ScoreProgress) -> None:
    for name, n in (chunk.unknown or {}).items():
        progress.unknown[name] = progress.unknown.get(name, 0) + n
