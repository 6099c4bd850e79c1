"""What summing the metrics over uvicorn workers costs the hot path (issue 23).

Usage: ``python bench/metrics_multiproc.py [--runs 5] [--requests 6400] [--no-write]``

1. One observation of the request-latency histogram: the lock-free list (one process), the
   same written into the per-process mmap file (multiprocess mode), and prometheus_client's
   locked Histogram, in ns (median of 5 timeit runs of 200,000).
2. The app's CPU per ``/predict`` request without sockets (bench/inprocess.py, C=64), in a fresh
   process each, alternately without and with ``PROMETHEUS_MULTIPROC_DIR`` (the variable must
   be set before prometheus_client is imported, as ``skqk serve --workers N`` does): median of
   ``--runs`` each. Digits, ``mlp:64-64``, one torch thread.

Results go to the ``metrics_multiproc`` section of docs/BENCHMARKS.md.
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
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import machine_info, markdown_table, write_section

REPO = Path(__file__).resolve().parent.parent
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def observe_ns() -> dict[str, float]:
    from prometheus_client import CollectorRegistry, Histogram

    from app.serving.loop_metrics import LoopHistogram
    from app.serving.multiproc_metrics import SlotFile

    work = tempfile.mkdtemp(prefix="skqk-observe-")
    try:
        kinds = {
            "lock-free list (one process)": LoopHistogram("a", "d", ["m"], BUCKETS, CollectorRegistry()),
            "lock-free mmap file (multiprocess)": LoopHistogram(
                "b", "d", ["m"], BUCKETS, CollectorRegistry(),
                shared=SlotFile(f"{work}/histogram_loop_1.db")),
            "prometheus_client Histogram (locked)": Histogram("c", "d", ["m"], buckets=BUCKETS,
                                                              registry=CollectorRegistry()),
        }
        out = {}
        for name, metric in kinds.items():
            child = metric.labels("x")
            runs = [timeit.timeit(lambda c=child: c.observe(0.003), number=200_000) / 200_000 * 1e9
                    for _ in range(5)]
            out[name] = statistics.median(runs)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def child(data_dir: str, requests: int) -> None:
    """In a fresh process: app CPU µs per /predict (multiprocess mode iff the variable is set)."""
    import numpy as np
    from sklearn.datasets import load_digits

    from app.api.main import create_app
    from app.settings import get_settings
    from bench.inprocess import cpu_per_request

    os.environ.update(SKQK_DATA_DIR=data_dir, SKQK_API_KEY="bench", SKQK_LOG_LEVEL="warning",
                      SKQK_DEVICE="cpu", SKQK_TORCH_THREADS="1")
    get_settings.cache_clear()
    x = (load_digits().data[:64] / 16.0).astype(np.float32)
    bodies = [json.dumps({"inputs": [row.tolist()]}).encode() for row in x]
    app = create_app()
    us = cpu_per_request(app, "/predict", bodies, requests=requests, lifespan=True,
                         ready=lambda: app.state.skqk.holder.ready)
    multi = app.state.skqk.metrics.multiproc_path is not None if hasattr(app, "state") else None
    print(json.dumps({"us": us, "multiproc": multi}))


def run_child(data_dir: Path, requests: int, multiproc: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    metrics_dir = tempfile.mkdtemp(prefix="skqk-prom-") if multiproc else None
    if metrics_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    env["PYTHONPATH"] = str(REPO)
    try:
        cmd = [sys.executable, __file__, "--child", str(data_dir), "--requests", str(requests)]
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True, timeout=600)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["multiproc"] is multiproc, result
    return float(result["us"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--requests", type=int, default=6400)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.requests)
        return
    from app.serving.bootstrap import bootstrap_version

    from app.settings import Settings
    from app.storage import open_store

    micro = observe_ns()
    print({k: round(v) for k, v in micro.items()}, flush=True)
    work = Path(tempfile.mkdtemp(prefix="skqk-mp-"))
    try:
        settings = Settings(data_dir=work, bootstrap_dataset="digits", bootstrap_arch="mlp:64-64",
                            bootstrap_epochs=3, device="cpu")
        store = open_store(settings.resolved_database_url)
        bootstrap_version(store, settings)
        store.dispose()
        single, multi = [], []
        for _ in range(args.runs):  # alternated: drift in the machine's load hits both alike
            single.append(run_child(work, args.requests, False))
            multi.append(run_child(work, args.requests, True))
            print(f"single {single[-1]:.1f} µs, multiprocess {multi[-1]:.1f} µs", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    s, m = statistics.median(single), statistics.median(multi)
    micro_table = markdown_table(["histogram", "ns per observe (median of 5)"],
                                 [[k, f"{v:.0f}"] for k, v in micro.items()])
    app_table = markdown_table(["mode", "app CPU µs per /predict (median)", "runs"],
                               [["one process (no PROMETHEUS_MULTIPROC_DIR)", f"{s:.1f}",
                                 ", ".join(f"{v:.1f}" for v in single)],
                                ["multiprocess files (skqk serve --workers N)", f"{m:.1f}",
                                 ", ".join(f"{v:.1f}" for v in multi)]])
    text = (f"## Metrics summed over workers: the hot path's cost (`bench/metrics_multiproc.py`)\n\n"
            f"{machine_info()}; a shared machine (other work ran too).\n\n{micro_table}\n\n"
            f"App CPU per single-row `/predict` without sockets (bench/inprocess.py, C=64, {args.requests} "
            f"requests, digits `mlp:64-64`, one torch thread), each run a fresh process, alternated:\n\n"
            f"{app_table}\n\nMultiprocess / one process: {m / s:.3f}×.\n")
    print(text)
    if not args.no_write:
        write_section("metrics_multiproc", text)


if __name__ == "__main__":
    main()
