"""Single-row /predict next to the HTTP server's ceiling, before and after: the peer_bench harness.

    python3 -m bench.peer --harness PATH/TO/peer_bench [--before REV] [--rounds 3]

Each round runs the shared harness (``run.sh``: wrk closed loop, one 64-float digits row per
request, server pinned to CPU 1 and wrk to CPU 0, 10 s per level at C = 1, 16, 64) on
``raw`` (a bare ASGI callable on uvicorn: the HTTP server's ceiling), ``bare`` (a constant
FastAPI endpoint) and ``skqk`` (this checkout), then, with ``--before``, on ``skqk`` as it
was at that commit (``git archive`` into a temporary directory, run with the same Python and
packages). Ratios are taken within a round and their median reported.

It also measures each skqk's application CPU per request without sockets (bench/inprocess.py,
the same driver for both), which splits a request's time into the HTTP server's share and the
application's. Writes the ``peer`` section of docs/BENCHMARKS.md.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine_info, markdown_table, write_section  # noqa: E402

LEVELS = (1, 16, 64)


def skqk_wrapper(source: Path, into: Path) -> Path:
    """A directory with ``bin/skqk`` running the code under ``source`` (what run.sh's SKQK_VENV wants)."""
    (into / "bin").mkdir(parents=True, exist_ok=True)
    script = into / "bin" / "skqk"
    script.write_text(f'#!/bin/sh\nPYTHONPATH={source} exec {sys.executable} -c '
                      f'"from app.cli import main; main()" "$@"\n')
    script.chmod(0o755)
    return into


def harness_run(harness: Path, targets: list[str], venv: Path, work: Path) -> list[dict]:
    """One ``run.sh`` invocation → its result lines (one per target and level)."""
    out_dir = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    env = {**os.environ, "PEER_BENCH_DIR": str(out_dir), "SKQK_VENV": str(venv)}
    done = subprocess.run(["bash", str(harness / "run.sh"), *targets], env=env, capture_output=True,
                          text=True)
    results = sorted(out_dir.glob("results-*.jsonl"))
    if done.returncode != 0 or not results:
        raise SystemExit(f"run.sh {targets} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in results[-1].read_text().splitlines() if line.strip()]


def app_cpu_us(source: Path, data_dir: Path) -> float:
    """Median application CPU µs per /predict at C=64 without sockets, for the code under ``source``."""
    code = f"""
import os, statistics, sys
sys.path.insert(0, {str(source)!r}); sys.path.insert(1, {str(ROOT)!r})
os.environ.update(SKQK_DATA_DIR={str(data_dir)!r}, SKQK_LOG_LEVEL="warning", SKQK_DEVICE="cpu",
                  SKQK_DATABASE_URL="sqlite:///{data_dir}/skqk.db")
from bench.inprocess import cpu_per_request
from app.api.main import create_app
body = b'{{"inputs": [[' + b", ".join(b"%.4f" % (i % 17) for i in range(64)) + b']]}}'
runs = []
for _ in range(5):
    app = create_app()
    runs.append(cpu_per_request(app, "/predict", [body], requests=12800, lifespan=True,
                                ready=lambda app=app: app.state.skqk.holder.ready))
print(statistics.median(runs))
"""
    done = subprocess.run(["taskset", "-c", "1", sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harness", type=Path, default=os.environ.get("PEER_BENCH_HARNESS"),
                    help="the peer_bench directory (run.sh); or PEER_BENCH_HARNESS")
    ap.add_argument("--before", help="a commit to measure beside this checkout")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.harness is None or not (args.harness / "run.sh").exists():
        raise SystemExit("--harness must name the peer_bench directory (with run.sh)")
    work = Path(tempfile.mkdtemp(prefix="skqk-peer-"))
    try:
        versions = {"skqk": ROOT}
        if args.before:
            old = work / "before"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before], capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            versions[f"skqk {args.before}"] = old
        wrappers = {name: skqk_wrapper(src, work / f"venv-{i}")
                    for i, (name, src) in enumerate(versions.items())}
        rounds: list[dict[tuple[str, int], dict]] = []
        for r in range(args.rounds):
            got: dict[tuple[str, int], dict] = {}
            for line in harness_run(args.harness, ["raw", "bare", "skqk"], wrappers["skqk"], work):
                got[(line["target"], line["concurrency"])] = line
            for name in list(versions)[1:]:
                for line in harness_run(args.harness, ["skqk"], wrappers[name], work):
                    got[(name, line["concurrency"])] = line
            rounds.append(got)
            print(f"round {r + 1}: " + ", ".join(f"{k[0]}@{k[1]} {v['rps']:.0f}/s" for k, v in got.items()),
                  flush=True)
        data_dir = work / "store"
        subprocess.run([sys.executable, "-c", "from app.cli import main; main()", "init",
                        "--dataset", "digits"],
                       env={**os.environ, "PYTHONPATH": str(ROOT), "SKQK_DATA_DIR": str(data_dir),
                            "SKQK_DATABASE_URL": f"sqlite:///{data_dir}/skqk.db"},
                       check=True, capture_output=True)
        cpu = {}
        for name, src in versions.items():
            if name != "skqk":  # the same in-process driver for both
                shutil.copy(ROOT / "bench" / "inprocess.py", src / "bench" / "inprocess.py")
            cpu[name] = app_cpu_us(src, data_dir)
        print("app CPU µs/request:", cpu, flush=True)
        md = render(rounds, list(versions), cpu, args)
        print(md)
        if not args.no_write:
            write_section("peer", md)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _median(rounds: list[dict], key: tuple[str, int], field: str) -> float:
    return statistics.median(r[key][field] for r in rounds)


def _ratio(rounds: list[dict], a: tuple[str, int], b: tuple[str, int]) -> float:
    return statistics.median(r[a]["rps"] / r[b]["rps"] for r in rounds)


def render(rounds: list[dict], skqks: list[str], cpu: dict[str, float], args: argparse.Namespace) -> str:
    targets = ["raw", "bare", *skqks]
    rows = []
    for t in targets:
        for c in LEVELS:
            key = (t, c)
            rows.append([t, c, f"{_median(rounds, key, 'rps'):,.0f}", f"{_median(rounds, key, 'p50_ms'):.2f}",
                         f"{_median(rounds, key, 'p99_ms'):.2f}", f"{_ratio(rounds, key, ('raw', c)):.2f}",
                         f"{_ratio(rounds, key, ('bare', c)):.2f}",
                         " / ".join(f"{r[key]['rps']:,.0f}" for r in rounds),
                         sum(r[key]["non_2xx"] + r[key]["socket_errors"] for r in rounds)])
    now = "skqk"
    p50, p99 = _median(rounds, (now, 64), "p50_ms"), _median(rounds, (now, 64), "p99_ms")
    bare_p99 = _median(rounds, ("bare", 64), "p99_ms")
    share = _ratio(rounds, (now, 64), ("raw", 64))
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    lines = [
        "## Single-row /predict beside the HTTP server's ceiling (`bench/peer.py`, the peer_bench harness)",
        "", machine_info(), "",
        f"The shared peer_bench harness (`run.sh raw bare skqk`): wrk closed loop, one 64-float digits row "
        f"per request, server pinned to CPU 1 and wrk to CPU 0, {os.environ.get('DURATION', '10')} s per "
        f"level after a {os.environ.get('WARMUP', '3')} s warm-up; "
        f"{len(rounds)} rounds, each running every target in turn. **raw** = a bare ASGI callable on "
        "uvicorn (the HTTP server's ceiling), **bare** = a constant FastAPI endpoint, **skqk** = this "
        "commit with default settings (`skqk serve`: version 1 bootstrapped on digits, `mlp:256-256`)"
        + (f", **skqk {skqks[1].split()[1]}** = the code before this work, same harness and packages" if
        len(skqks) > 1 else "") + ". Values are medians over the rounds; ratios are taken within a round.",
        "", markdown_table(["target", "C", "req/s", "p50 ms", "p99 ms", "÷ raw", "÷ bare", "rounds req/s",
                            "errors"], rows), "",
        "Targets (C=64, this commit):", "",
        f"- p99 ≤ 3× p50: {p99:.2f} ms vs 3 × {p50:.2f} ms: {verdict(p99 <= 3 * p50)}",
        f"- p99 ≤ the constant FastAPI endpoint's p99: {p99:.2f} vs {bare_p99:.2f} ms: "
        f"{verdict(p99 <= bare_p99)}",
        f"- throughput ≥ 0.5× raw ASGI: {share:.2f}×: {verdict(share >= 0.5)}",
    ]
    if len(skqks) > 1:
        old = skqks[1]
        lines.append(f"- c=1 p50 not above before: {_median(rounds, (now, 1), 'p50_ms'):.2f} ms vs "
                     f"{_median(rounds, (old, 1), 'p50_ms'):.2f} ms")
    http_us = 1e6 / _median(rounds, ("raw", 64), "rps")
    lines += ["", "Where a request's time goes at C=64 (one core serves everything, so µs per request = "
              "1 / req/s). *HTTP server* is the raw target's whole cost; *application* is the app's CPU per "
              "request without sockets (`bench/inprocess.py`: the ASGI app driven in-process at C=64 through "
              "the same body, median of 5, forward passes included); the remainder is what the two do not "
              "account for together (thread hand-offs, cache misses, the kernel):", ""]
    split = []
    for name in skqks:
        total = 1e6 / _median(rounds, (name, 64), "rps")
        rest = total - http_us - cpu[name]
        split.append([name, f"{total:.1f}", f"{http_us:.1f}", f"{cpu[name]:.1f}", f"{rest:.1f}"])
    lines.append(markdown_table(["server", "µs / request", "HTTP server (raw)", "application (in-process)",
                                 "remainder"], split))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
