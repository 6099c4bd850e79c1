"""Mixed-type tables: ``skqk ingest`` rows/s of a Parquet file with text, booleans and missing
values (beside an all-numeric file of the same rows, same run), and ``skqk predict`` rows/s
beside the in-process forward alone.

Usage: ``python bench/tables.py [--rows 1000000] [--runs 3]``

The file: 3 text columns (3, 12 and 40 categories), 5 numeric columns (5 % nulls), 2 booleans
(2 % nulls) and a text label, row groups of 100,000. The version: an untrained ``mlp:256-256``
over the encoding fitted on the first 20,000 rows (training does not change the costs measured
here). Ingest runs ``app.intake.file_ingest.ingest_file`` (what ``skqk ingest`` runs, without
the interpreter start-up) into a fresh SQLite store per run; the numeric file holds the same
values as floats (text columns as category codes, nulls as 0), the plain numeric path of before.
Scoring runs ``app.intake.batch_scoring.score_file`` (what ``skqk predict`` runs) to a Parquet
output, and the forward alone is ``LoadedModel.infer`` over the same encoded rows in the same
chunks. Results go to the ``tables`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import machine_info, markdown_table, write_section

CHUNK = 50_000
TARGET_NOTE = """Target of issue 19: `skqk ingest` of a 1 M-row mixed-type Parquet ≥ 100,000 rows/s on SQLite.
**Not met**: the typed path runs at about a quarter of the numeric one (ratio above), below
100,000 rows/s here even in-process; not run at 1 M rows (2-core machine shared with other
jobs, load shown above). Where a typed row's time goes (cProfile, 200,000 rows): SQLite execute
+ commit about a third (each row stores 69 float32 encoded inputs, 276 bytes, instead of 40,
plus its raw JSON, about 70 bytes), building the raw JSON rows (pyarrow) about a fifth, Parquet
decoding and parsing per type most of the rest. Cutting the stored width (one-hot inputs as
category codes) would change what every retrain reads; not done here.
"""


def make_files(folder: Path, rows: int, seed: int = 0, group: int = 100_000) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    gen = np.random.default_rng(seed)
    cats = {"c3": 3, "c12": 12, "c40": 40}
    mixed_path, numeric_path = folder / "mixed.parquet", folder / "numeric.parquet"
    mixed_w = numeric_w = None
    for start in range(0, rows, group):
        n = min(group, rows - start)
        mixed: dict[str, pa.Array] = {}
        numeric: dict[str, np.ndarray] = {}
        for name, k in cats.items():
            codes = gen.integers(0, k, n)
            mixed[name] = pa.array(np.array([f"{name}_v{i}" for i in range(k)], dtype=object)[codes])
            numeric[name] = codes.astype(np.float32)
        for j in range(5):
            v = gen.normal(size=n).astype(np.float32)
            nulls = gen.random(n) < 0.05
            mixed[f"x{j}"] = pa.array(v, mask=nulls)
            numeric[f"x{j}"] = np.where(nulls, 0, v).astype(np.float32)
        for j in range(2):
            b = gen.random(n) < 0.5
            nulls = gen.random(n) < 0.02
            mixed[f"b{j}"] = pa.array(b, mask=nulls)
            numeric[f"b{j}"] = np.where(nulls, 0, b).astype(np.float32)
        label = np.where(numeric["x0"] > 0, "up", "down")
        mixed["label"] = pa.array(label)
        numeric["label"] = pa.array(label)
        mt, nt = pa.table(mixed), pa.table(numeric)
        if mixed_w is None:
            mixed_w = pq.ParquetWriter(mixed_path, mt.schema)
            numeric_w = pq.ParquetWriter(numeric_path, nt.schema)
        mixed_w.write_table(mt)
        numeric_w.write_table(nt)
    mixed_w.close()
    numeric_w.close()
    return mixed_path, numeric_path


def schemas(mixed: Path, numeric: Path):  # -> (typed schema, numeric schema)
    import pyarrow.parquet as pq

    from app.core.encoding import Encoding
    from app.core.features import FeatureSchema
    from app.intake.files.typed import infer_kind, parse_arrow

    head = pq.ParquetFile(mixed).read_row_group(0).slice(0, 20_000)
    names = [c for c in head.column_names if c != "label"]
    kinds = [infer_kind(head.column(c)) for c in names]
    parsed = [parse_arrow(head.column(c), k, c, j) for j, (c, k) in enumerate(zip(names, kinds, strict=True))]
    enc = Encoding.fit(names, kinds, parsed)
    typed = FeatureSchema(tuple(enc.input_names()), (enc.width,), num_classes=2, class_names=("down", "up"),
                          label_column="label", encoding=enc)
    plain = FeatureSchema(tuple(names), (len(names),), num_classes=2, class_names=("down", "up"),
                          label_column="label")
    return typed, plain


def time_ingest(schema, path: Path) -> float:
    from app.intake.file_ingest import ingest_file
    from app.storage import open_store

    with tempfile.TemporaryDirectory() as d:
        store = open_store(f"sqlite:///{d}/skqk.db")
        t0 = time.perf_counter()
        report = ingest_file(store, schema, path, ["label"], CHUNK, check_ranges=False)
        seconds = time.perf_counter() - t0
        store.dispose()
    return report.rows_read / seconds


def time_scoring(schema, path: Path, folder: Path) -> tuple[float, float]:
    """(skqk predict rows/s, forward-alone rows/s) of one run."""
    from app.core.network import DecoupledModel, ReLUNet
    from app.core.spec import resolve_arch
    from app.intake.batch_scoring import score_file
    from app.intake.files.readers import iter_scoring_chunks
    from app.serving.holder import ModelHolder
    from app.serving.models import register_model
    from app.storage import open_store

    store = open_store(f"sqlite:///{folder}/score.db")
    if store.active_version() is None:
        spec = resolve_arch("mlp:256-256", schema.input_dim, 2)
        v = register_model(store, DecoupledModel.from_net(ReLUNet(spec, seed=0)), "full", None, {},
                           data_watermark=0, schema=schema)
        store.activate(v, actor="bench", reason="bench")
    t0 = time.perf_counter()
    report = score_file(store, path, folder / "scored.parquet", chunk_rows=CHUNK)
    predict_rate = report.rows / (time.perf_counter() - t0)
    loaded = ModelHolder(store, device="cpu", warmup_batch_sizes=(1,)).load(store.active_version())
    xs = [c.x for c in iter_scoring_chunks(path, list(schema.columns), schema.encoding, [], CHUNK)]
    t0 = time.perf_counter()
    for x in xs:
        loaded.infer(x)
    forward_rate = sum(len(x) for x in xs) / (time.perf_counter() - t0)
    store.dispose()
    return predict_rate, forward_rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        mixed, numeric = make_files(folder, args.rows)
        typed, plain = schemas(mixed, numeric)
        width = typed.input_dim
        ing_mixed, ing_plain, pred, fwd = [], [], [], []
        for _ in range(args.runs):  # interleaved: both paths see the same machine load
            ing_mixed.append(time_ingest(typed, mixed))
            ing_plain.append(time_ingest(plain, numeric))
            p, f = time_scoring(typed, mixed, folder)
            pred.append(p)
            fwd.append(f)
    med = statistics.median
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    runs = lambda vs: " / ".join(f"{v:,.0f}" for v in vs)  # noqa: E731
    n = f"{args.rows:,}"
    table = markdown_table(
        ["what", "rows", "rows/s (median)", f"runs ({args.runs})"],
        [[f"ingest, mixed-type Parquet (10 columns → {width} inputs)", n, f"{med(ing_mixed):,.0f}",
          runs(ing_mixed)],
         ["ingest, the same rows all numeric (10 inputs, plain path)", n, f"{med(ing_plain):,.0f}",
          runs(ing_plain)],
         ["skqk predict (read, encode, forward, write Parquet)", n, f"{med(pred):,.0f}", runs(pred)],
         ["in-process forward alone (same encoded chunks)", n, f"{med(fwd):,.0f}", runs(fwd)]])
    text = f"""## Mixed-type tables: ingest and batch scoring (`bench/tables.py`)

{machine_info()}

{__doc__.split(chr(10) + chr(10), 1)[1].split("Results go to")[0].strip()}

SQLite; median of {args.runs} runs; load average at the end {load} (2-core machine shared with
other jobs). Ratios: mixed / numeric ingest {med(ing_mixed) / med(ing_plain):.2f}; skqk predict /
forward alone {med(pred) / med(fwd):.2f}.

{table}

""" + TARGET_NOTE
    print(text)
    if not args.no_write:
        write_section("tables", text)


if __name__ == "__main__":
    main()
