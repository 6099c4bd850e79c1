"""Retrains on a growing store: QK and full retrain time and peak RSS at 100 k, 1 M and 3 M
stored 64-feature samples with 10 k new since the last retrain (SQLite and Postgres), ingest
into Postgres (rows/s), and `/ingest` latency as the table grows (issue 13).

Usage: ``python bench/scale.py [--sizes 100000,1000000,3000000] [--backends sqlite,postgres]
[--epochs 3] [--memory-mb 1024] [--no-write]``

``--refit-only [--repeats 3]``: only the QK comparison of issue 23 (default settings, i.e. the
bounded refit above SKQK_RETRAIN_REFIT_MAX_ROWS, against the exact refit, each ``--repeats``
times on the very same store state: the candidate is rolled back after each run), written to
its own section (``scale_refit``) of docs/BENCHMARKS.md.

Per backend, one store grows through the sizes. It starts from a version 1 bootstrapped on
20,000 synthetic teacher-labelled rows (``app.core.data.synthetic_arrays``: 64 standard-normal
features, 10 classes; nothing is downloaded) with ``mlp:256-256``; more rows of the same
distribution are added with ``Store.ingest`` in batches of 100,000 (Postgres: COPY, timed for
the ingest rate). At each size:

1. a QK retrain brings the feature cache and the champion's watermark up to date (not timed);
2. 10,000 new rows, then a QK retrain (``mode=qk``: the network runs on the blocks holding
   new rows only; the readout refit passes over every cached training row: exact full batch);
3. another 10,000 new rows, then the same QK retrain with
   ``SKQK_RETRAIN_REFIT_MAX_ROWS=200000`` (the refit's rows bounded: every new row plus a
   reweighted id-hashed sample of the old ones);
4. a full retrain (``--epochs`` epochs; streamed from the store once the rows exceed the memory
   budget), then rolled back so that the next size keeps the selector (and its cache), as a
   service between full retrains would;
5. `skqk serve` runs on the store and answers 200 sequential one-row ``/ingest`` calls
   (p50/p95 ms after 20 warm-ups).

Each retrain runs as a fresh child process: wall time (start-up and imports included) and the
child's peak RSS (``getrusage``, reported by the child) are measured.
The retrains run with ``SKQK_RETRAIN_MEMORY_MB`` = ``--memory-mb`` and one torch thread per
process (the machine is shared). Results go to the ``scale`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import machine_info, markdown_table, write_section

REPO = Path(__file__).resolve().parent.parent
NEW_ROWS = 10_000
REFIT_BUDGET = 200_000
SEED_ROWS = 20_000


def child_env(data_dir: Path, database_url: str | None, memory_mb: int, epochs: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKQK_")}
    env.update(SKQK_DATA_DIR=str(data_dir), SKQK_DEVICE="cpu", SKQK_RETRAIN_MEMORY_MB=str(memory_mb),
               SKQK_RETRAIN_EPOCHS=str(epochs), SKQK_PROMOTION_TOLERANCE="1.0", SKQK_TORCH_THREADS="1",
               SKQK_INPUT_RANGE="off", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if database_url:
        env["SKQK_DATABASE_URL"] = database_url
    return env


def run_child(mode: str, env: dict[str, str]) -> tuple[float, int, dict[str, Any]]:
    """(wall s, peak RSS bytes, job result) of one retrain in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()  # the child reports its own peak RSS (getrusage)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"retrain {mode} failed ({proc.returncode}):\n{err[-3000:]}")
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1])
    return wall, int(result.pop("_maxrss_bytes")), result


def child(mode: str) -> None:
    """In the child: one retrain job, its result and this process's peak RSS as JSON."""
    import resource

    import torch

    from app.retrain.job import run_retrain_job
    from app.settings import Settings
    from app.storage import Store

    torch.set_num_threads(1)
    settings = Settings()
    store = Store(settings.resolved_database_url)
    job_id = f"bench-{mode}-{uuid.uuid4().hex[:8]}"
    store.create_job(job_id, mode, runner="bench")
    t0 = time.perf_counter()
    result = run_retrain_job(store, settings, job_id, mode)
    result["_job_s"] = time.perf_counter() - t0
    result["_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    store.dispose()
    print(json.dumps(result, default=str))


def grow(store: Any, target: int, seed: int, timings: list[float]) -> int:
    """Ingest synthetic rows until ``target`` are stored; returns the rows added."""
    from app.core.data import synthetic_arrays

    added = 0
    while (have := store.sample_count()) < target:
        n = min(100_000, target - have)
        x, y = synthetic_arrays(n, 64, seed=seed + have)
        t0 = time.perf_counter()
        store.ingest(x, y)
        timings.append(time.perf_counter() - t0)
        added += n
    return added


def ingest_latency(data_dir: Path, database_url: str | None, requests: int = 200) -> tuple[float, float]:
    """p50/p95 ms of one-row /ingest calls against a real `skqk serve` on this store."""
    import httpx

    from bench.ingest_total import ingest_latencies_ms
    from tests.helpers.server import ServerProcess

    env = child_env(data_dir, database_url, 1024, 3)
    env.update(SKQK_API_KEY="bench-key", SKQK_TORCH_THREADS="1")
    server = ServerProcess(data_dir, env).start(ready_timeout=180)
    try:
        rng = np.random.default_rng(7)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            times = sorted(ingest_latencies_ms(c, requests,
                                               lambda: rng.standard_normal(64).astype(np.float32).tolist()))
        return statistics.median(times), times[int(0.95 * len(times)) - 1]
    finally:
        server.stop()


def bench_backend(backend: str, sizes: list[int], work: Path, memory_mb: int, epochs: int,
                  database_url: str | None) -> tuple[list[list[object]], dict[str, float]]:
    from app.intake.bootstrap import bootstrap_version
    from app.settings import Settings
    from app.storage import open_store

    data_dir = work / backend
    env = child_env(data_dir, database_url, memory_mb, epochs)
    settings = Settings(data_dir=data_dir, database_url=database_url, bootstrap_dataset="synthetic",
                        bootstrap_arch="mlp:256-256", bootstrap_epochs=5, device="cpu")
    store = open_store(settings.resolved_database_url)
    bootstrap_version(store, settings, synthetic_n=SEED_ROWS)
    rows: list[list[object]] = []
    costs: list[list[object]] = []
    ingest_s: list[float] = []
    ingest_rows = 0
    for size in sizes:
        ingest_rows += grow(store, size, seed=1, timings=ingest_s)
        run_child("qk", env)  # brings cache and watermark up to date: the "last retrain"
        grow(store, size + NEW_ROWS, seed=2, timings=[])
        qk_wall, qk_rss, qk = run_child("qk", env)  # exact: the refit passes over every cached row
        grow(store, size + 2 * NEW_ROWS, seed=3, timings=[])  # again 10 k new since the last retrain
        budget_env = {**env, "SKQK_RETRAIN_REFIT_MAX_ROWS": str(REFIT_BUDGET)}
        qkb_wall, qkb_rss, qkb = run_child("qk", budget_env)
        champion = store.active_version()
        full_wall, full_rss, full = run_child("full", env)
        store.activate(champion, "bench", "keep the selector between sizes")  # undo the full retrain
        p50, p95 = ingest_latency(data_dir, database_url)
        cache = qk["feature_cache"] or {}
        rows.append([backend, f"{qk['n_samples']:,}", f"{qk_wall:.1f}", f"{qk_rss / 2**20:,.0f}",
                     f"{cache.get('rows_computed', 0):,}", f"{qk['candidate']['holdout_acc']:.4f}",
                     f"{qkb_wall:.1f}", f"{qkb_rss / 2**20:,.0f}", f"{qkb['candidate']['holdout_acc']:.4f}",
                     f"{full_wall:.1f}", f"{full_rss / 2**20:,.0f}",
                     f"{full['candidate']['holdout_acc']:.4f}",
                     "yes" if full.get("streamed") else "no", f"{p50:.1f} / {p95:.1f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
        costs.append([*per_sample_costs(backend, qk, full),
                      f"{store_bytes(store, data_dir) / max(qk['n_samples'], 1):.0f}",
                      f"{dir_bytes(data_dir / 'feature-cache') / max(qk['n_samples'], 1):.0f}"])
    store.dispose()
    rate = {"rows": ingest_rows, "seconds": sum(ingest_s)}
    return rows, costs, rate


def bench_refit(sizes: list[int], work: Path, memory_mb: int, repeats: int) -> list[dict[str, Any]]:
    """QK with default settings vs the exact refit (SKQK_RETRAIN_REFIT_MAX_ROWS=0), SQLite, on the
    same store state each: 10 k rows new since the champion, the candidate rolled back after each run."""
    from app.serving.bootstrap import bootstrap_version

    from app.settings import Settings
    from app.storage import open_store

    data_dir = work / "refit"
    env = child_env(data_dir, None, memory_mb, 3)
    exact_env = {**env, "SKQK_RETRAIN_REFIT_MAX_ROWS": "0"}
    settings = Settings(data_dir=data_dir, database_url=None, bootstrap_dataset="synthetic",
                        bootstrap_arch="mlp:256-256", bootstrap_epochs=5, device="cpu")
    store = open_store(settings.resolved_database_url)
    bootstrap_version(store, settings, synthetic_n=SEED_ROWS)
    out = []
    for size in sizes:
        grow(store, size, seed=1, timings=[])
        run_child("qk", exact_env)  # brings cache and watermark up to date: the "last retrain"
        grow(store, size + NEW_ROWS, seed=2, timings=[])
        champion = store.active_version()
        runs: dict[str, list[tuple[float, int, dict[str, Any]]]] = {"default": [], "exact": []}
        for _ in range(repeats):
            for name, e in (("default", env), ("exact", exact_env)):
                runs[name].append(run_child("qk", e))
                store.activate(champion, "bench", "the next run sees the same state")
        row: dict[str, Any] = {"size": size}
        for name, rs in runs.items():
            row[name] = {"s": statistics.median(r[0] for r in rs), "all_s": [round(r[0], 1) for r in rs],
                         "rss_mb": max(r[1] for r in rs) / 2**20,
                         "job_s": statistics.median(r[2]["_job_s"] for r in rs),
                         "train_s": statistics.median(r[2]["timings"]["train_s"] for r in rs),
                         "acc": [r[2]["candidate"]["holdout_acc"] for r in rs],
                         "refit": rs[0][2].get("refit") or {}, "n_samples": rs[0][2]["n_samples"]}
        print(json.dumps(row, default=str), flush=True)
        out.append(row)
    store.dispose()
    return out


def refit_section(rows: list[dict[str, Any]], memory_mb: int, repeats: int, wall: float) -> str:
    table = []
    for r in rows:
        d, e = r["default"], r["exact"]
        da, ea = statistics.median(d["acc"]), statistics.median(e["acc"])
        kind = d["refit"].get("kind", "?")
        if kind == "sampled":
            kind += f" (p={d['refit']['old_fraction']:.3f}, ≈{d['refit']['expected_rows']:,} rows)"
        table.append([f"{d['n_samples']:,}", kind, f"{d['s']:.1f}", f"{d['job_s']:.1f}",
                      f"{d['train_s']:.2f}", f"{da:.4f}", f"{e['s']:.1f}", f"{e['job_s']:.1f}",
                      f"{e['train_s']:.2f}", f"{ea:.4f}",
                      f"{100 * (da - ea):+.3f}", f"{d['rss_mb']:,.0f} / {e['rss_mb']:,.0f}"])
    lo, hi = rows[0]["default"], rows[-1]["default"]
    ratio = hi["s"] / lo["s"]
    exact_ratio = rows[-1]["exact"]["s"] / rows[0]["exact"]["s"]
    headers = ["samples in the retrain", "default refit", "QK default s", "job s", "refit s",
               "holdout acc", "QK exact s", "job s", "refit s", "holdout acc", "Δ acc (points)",
               "peak RSS MB default / exact"]
    return (f"## QK retrain cost follows the new data (`bench/scale.py --refit-only`)\n\n{machine_info()}; "
            f"SQLite, SKQK_RETRAIN_MEMORY_MB={memory_mb}, one torch thread per process, niced on a shared "
            f"machine; median of {repeats} runs each; whole run {wall:.0f} s.\n\n"
            "Each size has 10,000 samples ingested since the champion's retrain (its feature cache warm). "
            "`QK default`: a QK retrain with default settings (SKQK_RETRAIN_REFIT_MAX_ROWS=200000: above "
            "200,000 training rows every new row plus an id-hashed, reweighted sample of the old ones, "
            "warm-started from the champion's readout). `QK exact`: the same with "
            "SKQK_RETRAIN_REFIT_MAX_ROWS=0 (every row). Both run on the very same store state (the "
            "candidate is rolled back after each run), as fresh processes: `s` is the wall time "
            "(start-up and imports included), `job s` the job alone, `refit s` the readout refit.\n\n"
            f"{markdown_table(headers, table)}\n\n"
            f"QK default at {hi['n_samples']:,} / at {lo['n_samples']:,}: **{ratio:.2f}×** wall "
            f"(target ≤ 3×); the exact refit: {exact_ratio:.2f}×. All runs (s): "
            + "; ".join(f"{r['size']:,}: default {r['default']['all_s']}, exact {r['exact']['all_s']}"
                        for r in rows) + ".\n")


def store_bytes(store: Any, data_dir: Path) -> int:
    """The samples table's size on disk (SQLite: the whole file; Postgres: table + indexes + TOAST)."""
    if store.backend == "sqlite":
        return sum(p.stat().st_size for p in data_dir.glob("skqk.db*"))
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_total_relation_size('samples')")).scalar_one())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def per_sample_costs(backend: str, qk: dict[str, Any], full: dict[str, Any]) -> list[object]:
    """µs per sample of each stage, from the jobs' own timings (for docs/SCALING.md)."""
    cache = qk["feature_cache"] or {}
    feature_us = 1e6 * cache.get("seconds", 0.0) / max(cache.get("rows_computed", 0), 1)
    refit_rows = qk["n_train"] + qk["n_val"]
    passes = (qk.get("refit_iterations") or 0) + 3  # gram + start/end validation passes, ≥ 1 per iteration
    refit_us = 1e6 * (qk["timings"]["train_s"]) / max(refit_rows * passes, 1)
    eval_us = 1e6 * qk["timings"]["eval_s"] / max(qk["n_holdout"], 1)
    epochs = max(full.get("epochs_run") or 1, 1)
    full_us = 1e6 * full["timings"]["train_s"] / max(full["n_train"] * epochs, 1)
    return [backend, f"{qk['n_samples']:,}", f"{feature_us:.1f}", f"{refit_us:.2f}",
            qk.get("refit_iterations"), f"{eval_us:.2f}", f"{full_us:.1f}", epochs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="100000,1000000,3000000")
    ap.add_argument("--backends", default="sqlite,postgres")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--refit-only", action="store_true", help="only QK default vs exact refit (SQLite)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="skqk-scale-"))
    if args.refit_only:
        started = time.perf_counter()
        try:
            rows = bench_refit(sizes, work, args.memory_mb, args.repeats)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        text = refit_section(rows, args.memory_mb, args.repeats, time.perf_counter() - started)
        print(text)
        if not args.no_write:
            write_section("scale_refit", text)
        return
    all_rows: list[list[object]] = []
    all_costs: list[list[object]] = []
    rates: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    try:
        for backend in args.backends.split(","):
            if backend == "postgres":
                from tests.helpers.pg import temporary_database

                with temporary_database(prefix="skqk_scale") as url:
                    rows, costs, rate = bench_backend(backend, sizes, work, args.memory_mb, args.epochs, url)
            else:
                rows, costs, rate = bench_backend(backend, sizes, work, args.memory_mb, args.epochs, None)
            all_rows += rows
            all_costs += costs
            rates[backend] = rate
    finally:
        shutil.rmtree(work, ignore_errors=True)
    headers = ["store", "samples in the retrain", "QK s", "QK peak RSS MB", "QK rows through the net",
               "QK holdout acc", f"QK budget {REFIT_BUDGET // 1000}k s", "QK budget peak RSS MB",
               "QK budget holdout acc", "full s", "full peak RSS MB", "full holdout acc", "full streamed",
               "/ingest p50 / p95 ms"]
    table = markdown_table(headers, all_rows)
    cost_table = markdown_table(["store", "samples", "feature pass µs/row", "refit µs/row/pass",
                                 "refit iterations", "holdout eval µs/row", "full µs/row/epoch",
                                 "full epochs", "store B/row", "feature cache B/row"], all_costs)
    ingest = "; ".join(f"{b}: {r['rows']:,} rows in {r['seconds']:.1f} s = "
                       f"{r['rows'] / r['seconds']:,.0f} rows/s"
                       for b, r in rates.items() if r["seconds"] > 0)
    text = (f"## Growing store: retrains with bounded memory (`bench/scale.py`)\n\n{machine_info()}; "
            f"SKQK_RETRAIN_MEMORY_MB={args.memory_mb}, full retrains {args.epochs} epochs, one torch thread "
            f"per process; whole run {time.perf_counter() - started:.0f} s.\n\n"
            "Each size has 10,000 samples ingested since the last retrain. QK and full retrain each "
            "run as a fresh process (wall time includes start-up and imports; peak RSS is that "
            "process's). `QK rows through the net`: rows whose features the QK retrain computed "
            "(the new rows' blocks); the rest came from the feature cache.\n\n"
            f"`QK budget`: the same with SKQK_RETRAIN_REFIT_MAX_ROWS={REFIT_BUDGET} (every new row plus a "
            "reweighted id-hashed sample of the old ones in the refit), on the next 10,000 new rows.\n\n"
            f"{table}\n\nPer-sample costs (from the jobs' own timings; the refit figure divides the "
            f"QK training time by rows × (iterations + 3) passes):\n\n{cost_table}\n\n"
            f"Store ingest (`Store.ingest`, batches of 100,000; Postgres: COPY): {ingest}.\n")
    print(text)
    if not args.no_write:
        write_section("scale", text)


if __name__ == "__main__":
    main()
