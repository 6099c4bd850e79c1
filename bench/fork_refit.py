"""The QK readout refit in a plain process vs in a forked child (a Celery prefork pool child),
at torch's default thread count and at one thread. Issue 23, item 5: a refit once took ~60 s
in a Celery worker against ~2 s in a plain process.

Usage: ``python bench/fork_refit.py [--rows 20000] [--repeats 3] [--timeout 60] [--no-write]``

The workload is ``fit_logistic_chunks`` (the refit's solver) over in-memory synthetic
256-wide features, 10 classes, 20 L-BFGS iterations, in chunks of 8,192 rows, in a child
process: spawned (a fresh interpreter), or forked from this process before it ran any torch
op, or forked after it ran one (its OpenMP thread pool started, as in a worker whose main
process touched torch before forking). A child that has not answered within ``--timeout``
seconds is killed and reported as such. Results go to the ``fork_refit`` section of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import machine_info, markdown_table, write_section

CHUNK = 8192


def refit_seconds(rows: int, threads: int | None) -> float:
    import torch

    from app.core.qk_stream import fit_logistic_chunks

    if threads is not None:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    phi = torch.relu(torch.randn(rows, 256, generator=g))
    y = (phi[:, :10].argmax(1) + (torch.rand(rows, generator=g) < 0.2).long()) % 10

    def source():
        for i in range(0, rows, CHUNK):
            yield phi[i: i + CHUNK], y[i: i + CHUNK], None

    t0 = time.perf_counter()
    fit_logistic_chunks(source, 256, 10, 1e-4, max_iter=20, tol=0.0)
    return time.perf_counter() - t0


def _child(rows: int, threads: int | None, out: mp.Queue) -> None:  # type: ignore[type-arg]
    out.put(refit_seconds(rows, threads))


def run(rows: int, threads: int | None, forked: bool, timeout: float) -> float | None:
    """Seconds of the refit in a child; None when it did not answer within ``timeout``."""
    import queue

    ctx = mp.get_context("fork" if forked else "spawn")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    p = ctx.Process(target=_child, args=(rows, threads, q))
    p.start()
    try:
        return float(q.get(timeout=timeout))
    except queue.Empty:
        p.kill()
        return None
    finally:
        p.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import torch

    default = torch.get_num_threads()
    rows: list[list[object]] = []
    started = time.perf_counter()

    def case(process: str, forked: bool, threads: int | None) -> None:
        ts = []
        for _ in range(args.repeats):
            t = run(args.rows, threads, forked, args.timeout)
            ts.append(t)
            if t is None:
                break  # a hang: once is enough
        done = [t for t in ts if t is not None]
        hung = len(done) < len(ts)
        median = f"no answer in {args.timeout:g} s" if hung else f"{statistics.median(done):.2f}"
        label = f"{default} (torch default)" if threads is None else str(threads)
        rows.append([process, label, median, ", ".join("hung" if t is None else f"{t:.2f}" for t in ts)])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)

    for threads in (None, 1):  # before this process runs any torch op
        case("forked, parent had run no torch op", True, threads)
    for threads in (None, 1):
        case("fresh process (spawn)", False, threads)
    torch.ones(512, 512) @ torch.ones(512, 512)  # now the parent's OpenMP pool exists
    for threads in (None, 1):
        case("forked after the parent ran a torch op", True, threads)
    table = markdown_table(["child process", "torch threads", "refit s (median)", "runs"], rows)
    text = (f"## The refit in a forked pool child (`bench/fork_refit.py`)\n\n{machine_info()}; "
            f"os.cpu_count() {os.cpu_count()}; {args.rows:,} rows × 256 features, 10 classes, 20 L-BFGS "
            f"iterations; median of {args.repeats}; whole run {time.perf_counter() - started:.0f} s "
            f"(a shared machine, load average {os.getloadavg()[0]:.1f} at the end).\n\n" + table + "\n")
    print(text)
    if not args.no_write:
        write_section("fork_refit", text)


if __name__ == "__main__":
    main()
