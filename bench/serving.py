"""Serving benchmark: single-sample /predict throughput and latency against the framework
ceiling, and /ingest samples/s. Writes the ``serving`` section of docs/BENCHMARKS.md.

    python3 bench/serving.py [--runs 3] [--seconds 3] [--concurrency 1,16,64]

All servers are real uvicorn processes on 127.0.0.1, started side by side and measured in
interleaved rounds (so a burst of load from elsewhere hits all of them alike):

- ``ceiling: raw ASGI``: a bare ASGI app returning a constant (uvicorn's own ceiling);
- ``ceiling: FastAPI``: the same constant behind a FastAPI route;
- ``skqk, no batching``: the real service with ``SKQK_MAX_BATCH_SIZE=1``;
- ``skqk, batching``: the real service with its defaults.

The load generator (bench/loadgen.py) is closed-loop: C keep-alive connections, each
sending its next request when the previous answer arrives; every run is capped in requests
and seconds. Client and servers share the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.loadgen import HOST, RunResult, build_request, run_load  # noqa: E402
from bench.report import machine_info, markdown_table, write_section  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path,
                 cpus: set[int] | None = None) -> None:
        self.name, self.port, self.cpus = name, free_port(), cpus
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.env, self.log = env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "wb") as out:
            cpus = self.cpus
            self.proc = subprocess.Popen(
                self.argv, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://{HOST}:{self.port}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def bootstrap(data_dir: Path, epochs: int) -> dict:
    from app.intake.bootstrap import bootstrap_version
    from app.settings import Settings
    from app.storage import open_store

    settings = Settings(data_dir=data_dir, database_url=None, bootstrap_epochs=epochs)
    store = open_store(settings.resolved_database_url)
    result = bootstrap_version(store, settings)
    with store.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    store.dispose()
    return {"version": result.version, **result.metrics}


def predict_requests(port: int, n: int = 64) -> list[bytes]:
    from sklearn.datasets import load_digits

    x = (load_digits().data / 16.0).astype(np.float32)
    return [build_request("/predict", json.dumps({"inputs": [x[i].tolist()]}).encode(), port)
            for i in range(n)]


def ingest_requests(port: int, batches: int, batch: int, tag: str) -> list[bytes]:
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    out = []
    for b in range(batches):
        x = rng.random((batch, 64), dtype=np.float32)
        y = rng.integers(0, 10, batch)
        body = {"samples": [{"features": x[i].tolist(), "label": int(y[i])} for i in range(batch)],
                "idempotency_key": f"bench-{tag}-{b}"}
        out.append(build_request("/ingest", json.dumps(body).encode(), port))
    return out


def inprocess_costs(data_dir: Path, runs: int) -> dict[str, float]:
    """Median app CPU µs per /predict request at C=64 with no sockets (bench/inprocess.py)."""
    from bench._ceiling import fastapi_app, raw_app
    from bench.inprocess import cpu_per_request

    os.environ.update({"SKQK_DATA_DIR": str(data_dir), "SKQK_API_KEY": "bench", "SKQK_LOG_LEVEL": "warning",
                       "SKQK_DEVICE": "cpu"})
    from app.api.main import create_app
    from app.settings import get_settings

    get_settings.cache_clear()
    bodies = [r.split(b"\r\n\r\n", 1)[1] for r in predict_requests(0)]
    out: dict[str, list[float]] = {}
    for _ in range(runs):
        out.setdefault("raw ASGI constant", []).append(cpu_per_request(raw_app, "/predict", bodies))
        out.setdefault("FastAPI constant", []).append(cpu_per_request(fastapi_app, "/predict", bodies))
        for name, size in (("skqk, no batching", "1"), ("skqk, batching", "64")):
            os.environ["SKQK_MAX_BATCH_SIZE"] = size
            get_settings.cache_clear()
            app = create_app()
            out.setdefault(name, []).append(cpu_per_request(
                app, "/predict", bodies, lifespan=True, ready=lambda app=app: app.state.skqk.holder.ready))
    os.environ.pop("SKQK_MAX_BATCH_SIZE", None)
    medians = {k: statistics.median(v) for k, v in out.items()}
    print("in-process CPU µs/request (C=64):", {k: round(v, 1) for k, v in medians.items()}, flush=True)
    return medians


def summarize(results: list[RunResult]) -> dict[str, float]:
    return {"rps": statistics.median(r.throughput for r in results),
            "p50": statistics.median(r.p50_ms for r in results),
            "p99": statistics.median(r.p99_ms for r in results),
            "errors": sum(r.errors for r in results),
            "runs": [round(r.throughput) for r in results]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="cap per measurement run")
    ap.add_argument("--max-requests", type=int, default=30_000, help="cap per measurement run")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--ingest-batches", type=int, default=40)
    ap.add_argument("--ingest-batch-size", type=int, default=500)
    ap.add_argument("--ingest-concurrency", default="1,4")
    ap.add_argument("--bootstrap-epochs", type=int, default=10)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data dir and server logs")
    ap.add_argument("--pin", action="store_true",
                    help="pin the load generator to CPU 0 and the servers to the other CPUs (best on an "
                         "idle machine; on a shared one it can put the servers next to a busy job)")
    args = ap.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.machine = machine_info()  # before anything here changes torch's thread count
    load_before = os.getloadavg()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"uptime before: {uptime}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="skqk-bench-"))
    data_dir = work / "data"
    t0 = time.perf_counter()
    boot = bootstrap(data_dir, args.bootstrap_epochs)
    print(f"bootstrapped v{boot['version']} ({boot['arch']}, holdout acc {boot['holdout_acc']:.3f}) "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)

    cpus = sorted(os.sched_getaffinity(0))
    server_cpus: set[int] | None = None
    if args.pin and len(cpus) >= 2:
        server_cpus = set(cpus[1:])
        os.sched_setaffinity(0, {cpus[0]})  # this process is the load generator
    args.pinning = (f"load generator pinned to CPU {cpus[0]}, servers to CPU(s) "
                    f"{','.join(map(str, sorted(server_cpus)))}" if server_cpus else "no CPU pinning")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SKQK_")}
    skqk_env = {**base_env, "SKQK_DATA_DIR": str(data_dir), "SKQK_API_KEY": "bench",
                "SKQK_LOG_LEVEL": "warning", "SKQK_DEVICE": "cpu"}
    uvicorn = [sys.executable, "-m", "uvicorn", "--host", HOST, "--port", "{port}", "--log-level", "warning",
               "--no-access-log"]
    serve = [sys.executable, "-m", "app.cli", "serve", "--host", HOST, "--port", "{port}"]
    nobatch_env = {**skqk_env, "SKQK_MAX_BATCH_SIZE": "1"}
    servers = [
        Server("ceiling: raw ASGI", [*uvicorn, "bench._ceiling:raw_app"], base_env, work / "raw.log",
               server_cpus),
        Server("ceiling: FastAPI", [*uvicorn, "bench._ceiling:fastapi_app"], base_env, work / "fastapi.log",
               server_cpus),
        Server("skqk, no batching", serve, nobatch_env, work / "nobatch.log", server_cpus),
        Server("skqk, batching", serve, skqk_env, work / "batch.log", server_cpus),
    ]
    results: dict[tuple[str, int], list[RunResult]] = {}
    ingest: dict[int, list[float]] = {}
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        requests = {s.name: predict_requests(s.port) for s in servers}
        for s in servers[2:]:  # the real service answers with a model version
            answer = httpx.post(f"http://{HOST}:{s.port}/predict", json={"inputs": [[0.5] * 64]}).json()
            assert answer["model_version"] == boot["version"], answer
        for s in servers:  # warm-up
            run_load(s.port, requests[s.name], 16, 1000, 2.0)
        for run in range(args.runs):
            for c in concurrencies:
                for s in servers:
                    r = run_load(s.port, requests[s.name], c, args.max_requests, args.seconds)
                    results.setdefault((s.name, c), []).append(r)
                    print(f"run {run + 1} c={c:<3} {s.name:<20} {r.throughput:8.0f} req/s  "
                          f"p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  errors {r.errors}", flush=True)
        target = servers[3]
        ingest_c = [int(c) for c in args.ingest_concurrency.split(",")]
        for run in range(args.runs):
            for c in ingest_c:
                reqs = ingest_requests(target.port, args.ingest_batches, args.ingest_batch_size, f"{run}-{c}")
                r = run_load(target.port, reqs, c, len(reqs), 120.0)
                if r.errors:
                    raise RuntimeError(f"{r.errors} ingest requests failed")
                rate = r.requests * args.ingest_batch_size / r.seconds
                ingest.setdefault(c, []).append(rate)
                print(f"run {run + 1} ingest c={c}: {rate:,.0f} samples/s "
                      f"({r.requests} × {args.ingest_batch_size}, p50 {r.p50_ms:.1f} ms)", flush=True)
    finally:
        for s in servers:
            s.stop()
    load_after = os.getloadavg()
    try:
        cpu = inprocess_costs(data_dir, args.runs)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    md = render(results, ingest, servers, concurrencies, args, boot, load_before, load_after, cpu)
    print(md)
    if not args.no_write:
        write_section("serving", md)
        print("wrote the serving section of docs/BENCHMARKS.md")
    return 0


def render(results: dict, ingest: dict, servers: list[Server], concurrencies: list[int],
           args: argparse.Namespace, boot: dict, load_before: tuple, load_after: tuple,
           cpu: dict[str, float]) -> str:
    raw, fast, nobatch, batch = (s.name for s in servers)
    rows = []
    for c in concurrencies:
        ceiling_raw = summarize(results[(raw, c)])["rps"]
        ceiling_fast = summarize(results[(fast, c)])["rps"]
        for s in servers:
            m = summarize(results[(s.name, c)])
            rows.append([c, s.name, f"{m['rps']:,.0f}", f"{m['p50']:.2f}", f"{m['p99']:.2f}",
                         f"{m['rps'] / ceiling_raw:.2f}", f"{m['rps'] / ceiling_fast:.2f}",
                         " / ".join(f"{v:,}" for v in m["runs"]), m["errors"]])
    top = max(concurrencies)
    b = summarize(results[(batch, top)])["rps"]
    r_raw, r_fast = (b / summarize(results[(raw, top)])["rps"], b / summarize(results[(fast, top)])["rps"])
    nb = summarize(results[(nobatch, top)])["rps"]
    ingest_rows = [[c, f"{statistics.median(v):,.0f}", " / ".join(f"{x:,.0f}" for x in v)]
                   for c, v in sorted(ingest.items())]
    best_ingest = max(statistics.median(v) for v in ingest.values())
    verdict_ingest = "met" if best_ingest >= 20_000 else "**missed**"
    cpu_rows = [[name, f"{us:.1f}"] for name, us in cpu.items()]
    app_us, raw_us = cpu.get("skqk, batching", float("nan")), cpu.get("raw ASGI constant", float("nan"))
    return f"""## Serving (`bench/serving.py`)

{args.machine}

Load average (1/5/15 min) before: {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f},
after: {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}. **Caveat:** this machine has 2 cores,
shared by the load generator, the server under test (event loop + one inference thread) and,
while this ran, other people's jobs (a load above ~1 means someone else was using a core).
Absolute numbers are therefore low and noisy; the ratios between servers measured in the
same interleaved rounds are the meaningful part.

Model: version {boot['version']}, `{boot['arch']}` bootstrapped on digits (holdout acc
{boot['holdout_acc']:.3f}); requests are single digits rows (64 features) to `POST /predict`.
Closed loop, keep-alive, C connections; {args.runs} interleaved runs per cell, each capped at
{args.seconds:g} s / {args.max_requests:,} requests; {args.pinning}. The table shows the median
of the runs (req/s of each run listed). Batching: `SKQK_MAX_BATCH_SIZE=64`, `SKQK_MAX_QUEUE_DELAY_MS=2`;
"no batching" is the same service with `SKQK_MAX_BATCH_SIZE=1`.

{markdown_table(["C", "server", "req/s", "p50 ms", "p99 ms", "÷ raw ASGI", "÷ FastAPI const",
                 "runs req/s", "errors"], rows)}

At C={top}: the batching service reaches **{r_raw:.2f}×** the bare-ASGI ceiling and
**{r_fast:.2f}×** a constant FastAPI endpoint; batching gives {b / nb:.2f}× the throughput of the
same service without batching. Here nothing is pinned: the load generator and the server
share both cores, so the ratios are lower than with the server on a core of its own (the
targets are judged with the pinned peer_bench harness: the *peer* section below).

Application CPU per request, measured without sockets (`bench/inprocess.py`: the ASGI apps
driven in-process at C=64, median of {args.runs}; includes the forward passes):

{markdown_table(["app", "CPU µs / request"], cpu_rows)}

The constant endpoint costs the application ~{raw_us:.0f} µs, so the bare-ASGI ceiling is set by
uvicorn's HTTP handling and the load generator alone. The real `/predict` adds ~{app_us - raw_us:.0f} µs
per request: the JSON parse (typed, in C: msgspec), the batching future, the forward pass
amortised over the batch, response encoding (orjson) and the metrics, on top of the same
HTTP handling; without batching every request pays a whole forward pass and a thread hop.

### Ingest

`POST /ingest`, {args.ingest_batch_size} samples × 64 features per request, each request a new
idempotency key, committed (SQLite WAL, `synchronous=FULL`) before the answer;
{args.ingest_batches} requests per run, median of {args.runs} runs.

{markdown_table(["C", "samples/s (median)", "runs"], ingest_rows)}

Best: **{best_ingest:,.0f} samples/s** (target ≥ 20,000: {verdict_ingest}).
"""


if __name__ == "__main__":
    raise SystemExit(main())
