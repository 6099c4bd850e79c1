"""`skqk explain FILE -o OUT.parquet [--version N]`: exact explanations of a data file's rows.

Reads the version's feature columns by name (CSV, Parquet; NPZ: array ``x`` by position) in
chunks, explains each chunk on the stored version (``app.serving.explaining``: the same maths
and reference as ``POST /explain``) and appends it to OUT (Parquet, or CSV by suffix): one
column per feature contribution, plus row, prediction, output, value, intercept, radius_l2,
radius_linf and active_units. Exit codes: 0 done, 1 bad data, 2 bad options or no version.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()
RESERVED = ("row", "prediction", "output", "value", "intercept", "radius_l2", "radius_linf", "active_units")


class BadData(ValueError):
    pass


def _fail(message: str, code: int) -> typer.Exit:
    console.print(f"[red]{message}", highlight=False)
    return typer.Exit(code)


def read_feature_chunks(path: Path, names: list[str], chunk_rows: int) -> Iterator[np.ndarray]:
    """float32 [≤ chunk_rows, D] chunks of the named columns; BadData names a missing column or bad row."""
    suffix = path.name.lower()
    if suffix.endswith(".npz"):
        with np.load(path) as z:
            if "x" not in z:
                raise BadData(f"{path.name}: an NPZ file needs an array named x")
            x = z["x"].reshape(z["x"].shape[0], -1)
        if x.shape[1] != len(names):
            raise BadData(f"{path.name}: x has {x.shape[1]} features per row, the model takes {len(names)}")
        for start in range(0, x.shape[0], chunk_rows):
            yield _checked(x[start:start + chunk_rows], start, names)
        return
    import pyarrow as pa

    if suffix.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        file = pq.ParquetFile(path)
        _check_columns(file.schema_arrow.names, names, path)
        batches: Iterator[Any] = file.iter_batches(batch_size=chunk_rows, columns=names)
    elif suffix.endswith((".csv", ".csv.gz")):
        import pyarrow.csv as pacsv

        with pacsv.open_csv(path) as probe:
            _check_columns(probe.schema.names, names, path)
        batches = pacsv.open_csv(path, convert_options=pacsv.ConvertOptions(
            include_columns=names, column_types={n: pa.float64() for n in names}))
    else:
        raise BadData(f"cannot tell the format of {path.name!r}: use .csv, .parquet or .npz")
    start = 0
    pending: list[np.ndarray] = []
    held = 0
    for batch in batches:
        cols = [batch.column(n).to_numpy(zero_copy_only=False).astype(np.float64) for n in names]
        part = np.column_stack(cols) if cols else np.empty((batch.num_rows, 0))
        pending.append(part)
        held += part.shape[0]
        while held >= chunk_rows:
            block = np.concatenate(pending)
            yield _checked(block[:chunk_rows], start, names)
            start += chunk_rows
            pending, held = [block[chunk_rows:]], block.shape[0] - chunk_rows
    if held:
        yield _checked(np.concatenate(pending), start, names)


def _check_columns(have: list[str], names: list[str], path: Path) -> None:
    missing = [n for n in names if n not in have]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BadData(f"{path.name}: no column {missing[0]!r}{more}; the model's features are needed by name")


def _checked(x: np.ndarray, start: int, names: list[str]) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = np.asarray(x, dtype=np.float64).astype(np.float32)
    bad = ~np.isfinite(x32)
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        raise BadData(f"row {start + r + 1}, column {names[c]!r}: value is missing, not a number or out of "
                      "float32 range")
    return x32


def _table(e: Any, first_row: int) -> Any:
    """One explained chunk → an Arrow table (one row per data row × explained output)."""
    import pyarrow as pa

    schema = e.schema
    n, k = e.chosen.shape
    labels = (list(schema.target_names) if schema.is_regression
              else schema.class_labels(np.arange(schema.num_outputs)))
    rows = np.repeat(np.arange(first_row, first_row + n), k)
    if schema.is_regression:
        prediction: Any = np.repeat(e.outputs[:, 0], k)
    else:
        prediction = np.repeat(np.asarray(schema.class_labels(e.predictions)), k)
    cols: dict[str, Any] = {
        "row": rows, "prediction": prediction,
        "output": [str(labels[c]) for c in e.chosen.reshape(-1)],
        "value": e.output_values().reshape(-1).astype(np.float64),
        "intercept": e.intercept.reshape(-1)}
    contrib = e.contributions.reshape(n * k, -1)
    for j, name in enumerate(e.names):
        cols[f"contribution:{name}" if name in RESERVED else name] = contrib[:, j]
    cols["radius_l2"] = np.repeat(e.radius_l2, k)
    cols["radius_linf"] = np.repeat(e.radius_linf, k)
    cols["active_units"] = np.repeat(e.active_units, k)
    return pa.table(cols)


def explain_command(
        file: Path = typer.Argument(..., exists=True, dir_okay=False, help="CSV, Parquet or NPZ (x)"),
        out: Path = typer.Option(..., "-o", "--out", help="OUT.parquet (or .csv)"),
        version: int | None = typer.Option(None, "--version", help="model version (default: the active one)"),
        output: str = typer.Option("predicted", "--output", help='"predicted" (regression: every target), '
                                                                 '"all", or a class or target name'),
        reference: str = typer.Option("mean", "--reference", help="mean (the stored training mean) | zero"),
        chunk_rows: int = typer.Option(4096, min=1, help="rows read and explained at a time"),
        radius: bool = typer.Option(True, "--radius/--no-radius",
                                    help="--no-radius: contributions only (several times faster)")) -> None:
    """Exact per-feature contributions, intercept and certified radius of every row of FILE."""
    from app.core.features import SchemaError
    from app.serving.explaining import ExplainInputError, compute, named_reference, resolve_outputs
    from app.serving.models import load_model, schema_of
    from app.settings import get_settings
    from app.storage import UnknownVersion, open_store

    store = open_store(get_settings().resolved_database_url)
    try:
        v = version if version is not None else store.active_version()
        if v is None:
            raise _fail("the store has no active model version: run `skqk init` (or `skqk serve`) first", 2)
        try:
            model, record = load_model(store, v)
        except UnknownVersion:
            raise _fail(f"model version {v} not found", 2) from None
    finally:
        store.dispose()
    model.eval()
    schema = schema_of(record, model.spec)
    which_value: Any = int(output) if output.isdigit() else output
    try:
        ref, source = named_reference(reference, schema, model.spec, "--reference")
        which = resolve_outputs(which_value, schema, "--output")
    except (ExplainInputError, SchemaError) as exc:
        raise _fail(str(exc), 2) from None
    total = _total_rows(file)
    progress = Progress(TextColumn("[bold]explain"), BarColumn(), TextColumn("{task.completed:,} rows"),
                        TimeRemainingColumn(), TimeElapsedColumn(), console=console)
    bar = progress.add_task("explain", total=total)
    writer = _Writer(out, {"skqk.model_version": str(v), "skqk.reference": source})
    done = 0
    try:
        with progress:
            for x in read_feature_chunks(file, list(schema.feature_names), chunk_rows):
                e = compute(model, schema, v, x, ref, source, which, radius)
                writer.write(_table(e, done + 1))
                done += x.shape[0]
                progress.update(bar, completed=done)
    except BadData as exc:
        raise _fail(str(exc), 1) from None
    finally:
        writer.close()
    console.print(f"{done:,} rows explained on version {v} (reference: {source}) → {out}")


def _total_rows(file: Path) -> int | None:
    name = file.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            return pq.ParquetFile(file).metadata.num_rows
        if name.endswith(".npz"):
            with np.load(file) as z:
                return int(z["x"].shape[0]) if "x" in z else None
    except Exception:  # the reader reports a broken file properly
        return None
    return None


class _Writer:
    """Appends Arrow tables to one Parquet (or CSV) file, opened at the first table."""

    def __init__(self, path: Path, metadata: dict[str, str]) -> None:
        self.path, self.metadata, self.sink = path, metadata, None

    def write(self, table: Any) -> None:
        if self.sink is None:
            table = table.replace_schema_metadata(self.metadata)
            if self.path.name.lower().endswith(".csv"):
                import pyarrow.csv as pacsv

                self.sink = pacsv.CSVWriter(str(self.path), table.schema)
            else:
                import pyarrow.parquet as pq

                self.sink = pq.ParquetWriter(str(self.path), table.schema)
        self.sink.write_table(table.replace_schema_metadata(self.metadata))

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
