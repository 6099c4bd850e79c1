"""Batch clients: 1,024 rows per Open Inference Protocol request, JSON against binary tensor data,
measured against the in-process speed of the served model at batch 1,024. Writes the
``batch-clients`` section of docs/BENCHMARKS.md.

    python3 bench/batch_clients.py [--runs 3] [--seconds 4] [--concurrency 1,2]

Two models, each bootstrapped here and served by its own real ``skqk serve`` (uvicorn, default
settings: one inference thread, ``SKQK_TORCH_THREADS=1``): the digits MLP (64-256-256-10) and
an MNIST-sized MLP (784-256-256-10, trained briefly on mnist5k). Per model and encoding:

- ``prebuilt``: bench/loadgen.py's closed-loop client sending ready-made request bytes over
  keep-alive connections (C of them), so the numbers are the server's: HTTP, parsing and
  validation, the forward pass, encoding the answer;
- ``tritonclient``: Triton's own Python client (``tritonclient.http``, C=1) encoding each
  request from a numpy array and decoding the answer, i.e. what a Python batch client gets.

JSON requests carry the rows as ``data`` and get JSON outputs; binary ones send the rows as
raw FP32 after the JSON part (``Inference-Header-Content-Length``) and ask for every output
as binary (``binary_data_output``). "In-process" is ``LoadedModel.infer`` on the same version
at batch 1,024 in this process (one torch thread, as the server), no HTTP: the decoupled
pair's own speed. Every round measures in-process and HTTP back to back, and each ratio is
taken within its round; the tables show medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.loadgen import HOST, run_load  # noqa: E402
from bench.report import machine_info, markdown_table, write_section  # noqa: E402
from bench.serving import Server  # noqa: E402

ROWS = 1024
MODELS = {"digits MLP": ("digits", 3), "MNIST-sized MLP": ("mnist5k", 2)}  # data set, bootstrap epochs
ARCH = "mlp:256-256"
TARGET = 0.5
INFER = "/v2/models/skqk/infer"
HEADER = "Inference-Header-Content-Length"


def bootstrap(data_dir: Path, dataset: str, epochs: int) -> dict[str, Any]:
    from app.intake.bootstrap import bootstrap_version
    from app.settings import Settings
    from app.storage import open_store

    settings = Settings(data_dir=data_dir, database_url=None, bootstrap_epochs=epochs)
    store = open_store(settings.resolved_database_url)
    result = bootstrap_version(store, settings, dataset=dataset, arch=ARCH)
    with store.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    store.dispose()
    return {"version": result.version, **result.metrics}


def batches(dataset: str, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` batches of 1,024 rows drawn from the data set, float32 as the model takes them."""
    from app.core.data import Split, load_dataset

    data = load_dataset(dataset, seed=seed)
    x = Split.concat([data.train, data.val, data.test]).x.numpy().astype(np.float32)
    rng = np.random.default_rng(seed)
    return [np.ascontiguousarray(x[rng.integers(0, len(x), ROWS)]) for _ in range(count)]


def json_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.reshape(-1)}]}, option=orjson.OPT_SERIALIZE_NUMPY)
    return body, {"Content-Type": "application/json"}


def binary_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}})
    return head + x.astype("<f4").tobytes(), {"Content-Type": "application/octet-stream",
                                              HEADER: str(len(head))}


ENCODINGS = {"JSON": json_body, "binary": binary_body}


def raw_request(port: int, body: bytes, headers: dict[str, str]) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"POST {INFER} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: {len(body)}\r\n{head}\r\n"
            ).encode() + body


def prediction_indices(r: httpx.Response) -> list[int]:
    """``prediction_indices`` of a JSON or a binary answer."""
    if r.headers["content-type"] == "application/json":
        return next(o["data"] for o in r.json()["outputs"] if o["name"] == "prediction_indices")
    length = int(r.headers[HEADER])
    at = length
    for out in orjson.loads(r.content[:length])["outputs"]:
        size = out["parameters"]["binary_data_size"]
        if out["name"] == "prediction_indices":
            return np.frombuffer(r.content[at:at + size], "<i8").tolist()
        at += size
    raise AssertionError("no prediction_indices in the answer")


def check_answers(port: int, x: np.ndarray) -> None:
    """JSON and binary answers agree with each other and with /predict before anything is timed."""
    url = f"http://{HOST}:{port}"
    answers = []
    for encode in ENCODINGS.values():
        body, headers = encode(x)
        r = httpx.post(url + INFER, content=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text[:500]
        answers.append(prediction_indices(r))
    rows = orjson.dumps({"inputs": x}, option=orjson.OPT_SERIALIZE_NUMPY)
    predict = httpx.post(url + "/predict", content=rows, headers={"Content-Type": "application/json"},
                         timeout=120).json()
    assert answers[0] == answers[1] == predict["prediction_indices"], "JSON, binary and /predict disagree"


def inprocess_rate(loaded: Any, x: np.ndarray, repeats: int = 15) -> float:
    """Samples/s of ``LoadedModel.infer`` at batch 1,024 (median call)."""
    loaded.infer(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loaded.infer(x)
        times.append(time.perf_counter() - t0)
    return ROWS / statistics.median(times)


def triton_rate(port: int, xs: list[np.ndarray], binary: bool, seconds: float, max_requests: int) -> float:
    """Samples/s of tritonclient.http, one request at a time, encoding and decoding included."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(f"{HOST}:{port}", network_timeout=300.0)
    try:
        def once(i: int) -> None:
            tensor = triton.InferInput("input", [ROWS, xs[0].shape[1]], "FP32")
            tensor.set_data_from_numpy(xs[i % len(xs)], binary_data=binary)
            outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "predictions")]
            result = client.infer("skqk", [tensor], outputs=outputs)
            assert result.as_numpy("predictions").shape == (ROWS,)

        once(0)  # warm-up (and a check)
        done, t0 = 0, time.perf_counter()
        while done < max_requests and (done == 0 or time.perf_counter() - t0 < seconds):
            once(done)
            done += 1
        return done * ROWS / (time.perf_counter() - t0)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="cap per measurement")
    ap.add_argument("--max-requests", type=int, default=2000, help="cap per measurement")
    ap.add_argument("--concurrency", default="1,2", help="connections of the prebuilt-request client")
    ap.add_argument("--no-triton", action="store_true", help="leave out the tritonclient rows")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data dirs and server logs")
    args = ap.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.machine = machine_info()
    load_before = os.getloadavg()
    print(f"uptime before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}",
          flush=True)
    triton = not args.no_triton
    if triton:
        try:
            import tritonclient.http  # noqa: F401
        except ImportError:
            print("tritonclient[http] not installed: leaving out its rows", flush=True)
            triton = False

    import torch

    from app.serving.holder import ModelHolder
    from app.storage import open_store

    torch.set_num_threads(1)  # as the server's inference thread (SKQK_TORCH_THREADS=1)
    work = Path(tempfile.mkdtemp(prefix="skqk-batch-"))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SKQK_")}
    serve = [sys.executable, "-m", "app.cli", "serve", "--host", HOST, "--port", "{port}"]
    boots, servers, data, loaded, stores = {}, {}, {}, {}, []
    # rate[(model, row label)] = per-round samples/s; ratio[...] = per-round ÷ in-process
    rate: dict[tuple[str, str], list[float]] = {}
    ratio: dict[tuple[str, str], list[float]] = {}
    try:
        for model, (dataset, epochs) in MODELS.items():
            data_dir = work / dataset
            t0 = time.perf_counter()
            boots[model] = bootstrap(data_dir, dataset, epochs)
            print(f"{model}: v{boots[model]['version']} {boots[model]['arch']} (holdout acc "
                  f"{boots[model]['holdout_acc']:.3f}) in {time.perf_counter() - t0:.1f}s", flush=True)
            env = {**base_env, "SKQK_DATA_DIR": str(data_dir), "SKQK_API_KEY": "bench",
                   "SKQK_LOG_LEVEL": "warning", "SKQK_DEVICE": "cpu",
                   "SKQK_MAX_BODY_BYTES": str(64 * 1024 * 1024)}  # 1,024 MNIST rows as JSON: ~15 MB
            servers[model] = Server(model, serve, env, work / f"{dataset}.log")
            servers[model].start()
            data[model] = batches(dataset, 4)
            store = open_store(f"sqlite:///{data_dir / 'skqk.db'}")
            stores.append(store)
            holder = ModelHolder(store, "cpu", warmup_batch_sizes=(1, ROWS))
            loaded[model] = holder.load(boots[model]["version"])
        for model, server in servers.items():
            server.wait_ready()
            check_answers(server.port, data[model][0])
        requests = {(model, enc): [raw_request(s.port, *encode(x)) for x in data[model]]
                    for model, s in servers.items() for enc, encode in ENCODINGS.items()}
        for (model, _enc), reqs in requests.items():  # warm-up
            run_load(servers[model].port, reqs, 1, 5, 10.0)
        for run in range(args.runs):
            for model, server in servers.items():
                inproc = inprocess_rate(loaded[model], data[model][0])
                rate.setdefault((model, "in-process"), []).append(inproc)
                cells: list[tuple[str, float]] = []
                for enc in ENCODINGS:
                    for c in concurrencies:
                        r = run_load(server.port, requests[(model, enc)], c, args.max_requests, args.seconds)
                        if r.errors:
                            raise RuntimeError(f"{r.errors} of {model} {enc} C={c} requests failed")
                        cells.append((f"{enc}|prebuilt|{c}", r.requests * ROWS / r.seconds))
                    if triton:
                        cells.append((f"{enc}|tritonclient|1", triton_rate(
                            server.port, data[model], enc == "binary", args.seconds, args.max_requests)))
                for label, value in cells:
                    rate.setdefault((model, label), []).append(value)
                    ratio.setdefault((model, label), []).append(value / inproc)
                    print(f"run {run + 1} {model:<16} {label:<24} {value:>10,.0f} samples/s "
                          f"({value / inproc:.2f}× in-process {inproc:,.0f})", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        for store in stores:
            store.dispose()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    md = render(rate, ratio, boots, args, load_before, os.getloadavg(), concurrencies)
    print(md)
    if not args.no_write:
        write_section("batch-clients", md)
        print("wrote the batch-clients section of docs/BENCHMARKS.md")
    return 0


def render(rate: dict, ratio: dict, boots: dict, args: argparse.Namespace, load_before: tuple,
           load_after: tuple, concurrencies: list[int]) -> str:
    rows, verdicts = [], []
    for model in MODELS:
        inproc = statistics.median(rate[(model, "in-process")])
        rows.append([model, "—", "in-process, batch 1,024", "—", f"{inproc:,.0f}", "1.00",
                     " / ".join(f"{v:,.0f}" for v in rate[(model, "in-process")])])
        for (m, label), values in rate.items():
            if m != model or label == "in-process":
                continue
            enc, client, c = label.split("|")
            rows.append([model, enc, client, c, f"{statistics.median(values):,.0f}",
                         f"{statistics.median(ratio[(m, label)]):.2f}",
                         " / ".join(f"{v:,.0f}" for v in values)])
        for enc in ENCODINGS:
            best_c, best = max(((c, statistics.median(ratio[(model, f"{enc}|prebuilt|{c}")]))
                                for c in concurrencies), key=lambda t: t[1])
            verdicts.append(f"- {model}, {enc}: **{best:.2f}×** in-process (C={best_c}): "
                            + ("met" if best >= TARGET else "**missed**"))
    return f"""## Batch clients: 1,024 rows per v2 request, JSON vs binary (`bench/batch_clients.py`)

{args.machine}

Load average (1/5/15 min) before: {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f},
after: {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}. Client, server and (while this
ran) other people's jobs share the machine's cores, so absolute numbers are noisy; the ratios,
each taken within one round, are the meaningful part.

Models: {', '.join(f"{m} `{boots[m]['arch']}`" for m in MODELS)} (bootstrapped here, one real
`skqk serve` each with default settings: one inference thread, `SKQK_TORCH_THREADS=1`;
`SKQK_MAX_BODY_BYTES` raised to 64 MiB for the ~15 MB JSON bodies of 1,024 MNIST rows). Every request
carries 1,024 rows to `POST /v2/models/skqk/infer`: **JSON** = the rows as `data`, JSON outputs;
**binary** = the rows as raw FP32 after the JSON part (`Inference-Header-Content-Length`), all
outputs binary (`binary_data_output`). Clients: **prebuilt** = bench/loadgen.py sending ready-made
request bytes over C keep-alive connections (what the server sustains); **tritonclient** =
`tritonclient.http`, one request at a time, encoding each request from numpy and decoding the
answer (what a Python batch client gets). **In-process** = `LoadedModel.infer` (the decoupled
selector/estimator pair as served) at batch 1,024 in the bench process, one torch thread, no
HTTP. {args.runs} rounds, each capped at {args.seconds:g} s / {args.max_requests:,} requests per cell;
samples/s and ÷ in-process are medians over the rounds (each ratio taken within its round).

{markdown_table(["model", "encoding", "client", "C", "samples/s", "÷ in-process", "rounds samples/s"], rows)}

Target ≥ {TARGET}× in-process samples/s at batch 1,024 (server side: prebuilt client, best C):

{chr(10).join(verdicts)}

JSON costs what it costs to turn 65,536 (digits) or 802,816 (MNIST) JSON numbers into Python
floats and then into an array, on the event loop, before the forward pass starts; binary
tensor data is one `np.frombuffer` (and one copy) in and one `.tobytes()` out per tensor, so
the answer time is mostly the forward pass plus moving the bytes. Measured alone on this
machine (2026-11-27): decoding one 1,024-row request takes 3.8 ms (digits; 1.3 MB of JSON) and
69 ms (MNIST; 15.5 MB) with the request model, 2.6 / 53 ms with orjson alone and 3.0 / 40 ms with
msgspec's typed decoder, and the list → float32 array step another 2.3 / 28 ms, while the
forward pass of the same 1,024 rows takes ~2.1 / ~6 ms. No Python JSON parser decodes numbers
fast enough for JSON to reach half the model's speed on these nets; batch clients should
send binary tensor data, which `tritonclient` does by default.
"""


if __name__ == "__main__":
    raise SystemExit(main())
