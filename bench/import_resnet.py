"""An imported ResNet-style network: import time, serving speed of the decoupled pair vs
onnxruntime on the source model, and a QK retrain vs a full retrain on the same data.

Usage: ``python bench/import_resnet.py [--runs 5] [--no-write]``

The ResNet of the importer tests (stem, two residual blocks, the second strided with a 1×1
shortcut, BatchNorm everywhere, global average pooling; input 3×16×16, 5 classes) is trained
on teacher-labelled images, exported with torch's ONNX exporter (BatchNormalization nodes
folded at import), and imported into a fresh SQLite store with its training data. Then, side
by side in one process:

- samples/s at batch 64: the decoupled pair (selector pass + gated estimator pass, torch, the
  serving threads setting) vs onnxruntime running the source ONNX file (1 intra-op thread);
- new data arrives (the same teacher, 50 % more rows); a QK retrain and a full retrain (the
  service's settings) run on old + new data; their holdout accuracy and wall time.
Results go to the ``import`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import machine_info, markdown_table, write_section
from tests.importers.nets import resnet_net, teacher_data, train_briefly


def rate(fn, x: np.ndarray, batch: int = 64, seconds: float = 2.0) -> float:
    """Samples per second of ``fn`` on batches of ``batch`` rows for about ``seconds``."""
    fn(x[:batch])
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        start = done % (len(x) - batch)
        fn(x[start:start + batch])
        done += batch
    return done / (time.perf_counter() - t0)


def verdict(ratio: float, target: float = 0.4) -> str:
    return f"{ratio:.2f}× ({'met' if ratio >= target else 'missed'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import onnxruntime as ort

    from app.intake.importing import import_model
    from app.retrain.job import run_retrain_job
    from app.serving.holder import compile_for_inference
    from app.serving.models import load_model
    from app.settings import Settings
    from app.storage import open_store

    work = Path(tempfile.mkdtemp(prefix="skqk-bench-import-"))
    x, y = teacher_data(2000, 0)
    torch.manual_seed(0)
    net = train_briefly(resnet_net(), torch.from_numpy(x), torch.from_numpy(y), steps=200, lr=0.05)
    onnx_path = work / "resnet.onnx"
    torch.onnx.export(net, (torch.from_numpy(x[:2]),), onnx_path, dynamo=False, input_names=["image"],
                      dynamic_axes={"image": {0: "batch"}})
    np.savez(work / "train.npz", x=x, y=y)
    settings = Settings(data_dir=work / "data", device="cpu", retrain_epochs=20, promotion_tolerance=0.01)
    store = open_store(settings.resolved_database_url)
    t0 = time.perf_counter()
    result = import_model(store, settings, onnx_path, work / "train.npz", ["y"])
    import_s = time.perf_counter() - t0
    model, _ = load_model(store, result.version)
    model.eval()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    flat = x.reshape(len(x), -1)

    served = compile_for_inference(model, torch.device("cpu"))  # what a replica runs

    def pair(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    def serving(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return served(torch.from_numpy(batch)).numpy()

    def onnxrt(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {"image": batch.reshape(-1, 3, 16, 16)})[0]

    pair_rates, serve_rates, ort_rates = [], [], []
    for _ in range(args.runs):  # interleaved, so all see the same machine load
        pair_rates.append(rate(pair, flat))
        serve_rates.append(rate(serving, flat))
        ort_rates.append(rate(onnxrt, flat))
    pair_med, ort_med = statistics.median(pair_rates), statistics.median(ort_rates)
    serve_med = statistics.median(serve_rates)

    new_x, new_y = teacher_data(1000, 1)
    store.ingest(new_x.reshape(len(new_x), -1), new_y, "bench-new")
    retrains = {}
    for mode in ("qk", "full"):
        job = f"bench-{mode}"
        store.create_job(job, mode, "bench")
        t0 = time.perf_counter()
        res = run_retrain_job(store, copy.copy(settings), job, mode)
        retrains[mode] = (time.perf_counter() - t0, res["candidate"]["holdout_acc"],
                          res["champion"]["holdout_acc"])
        store.activate(result.version, actor="bench", reason="same champion for both modes")
    store.dispose()

    rows = [["import (load, fold, check vs onnxruntime, store 2,000 rows, register)",
             f"{import_s:.2f} s", ""],
            ["decoupled pair, two passes (selector gates → gated estimator), batch 64 (samples/s)",
             f"{pair_med:,.0f}", " / ".join(f"{r:,.0f}" for r in pair_rates)],
            [f"what a replica serves ({type(served).__name__}), batch 64 (samples/s)", f"{serve_med:,.0f}",
             " / ".join(f"{r:,.0f}" for r in serve_rates)],
            ["onnxruntime on the source model, batch 64 (samples/s)", f"{ort_med:,.0f}",
             " / ".join(f"{r:,.0f}" for r in ort_rates)],
            ["ratio two-pass pair ÷ onnxruntime (target ≥ 0.4)", f"{pair_med / ort_med:.2f}", ""],
            ["ratio served ÷ onnxruntime", f"{serve_med / ort_med:.2f}", ""]]
    for mode, (secs, acc, champ) in retrains.items():
        rows.append([f"{mode} retrain on 3,000 rows: holdout acc (champion {champ:.3f})", f"{acc:.3f}",
                     f"{secs:.1f} s"])
    table = markdown_table(["measure", "value", "runs / time"], rows)
    md = f"""## Imported ResNet-style network (bench/import_resnet.py)

{machine_info()}

ResNet-style net of the importer tests (3×16×16 input, two residual blocks, BatchNorm folded at
import, global average pooling, 5 classes), trained briefly on teacher-labelled images and
imported from ONNX with its 2,000 training rows; 1,000 new rows of the same teacher are added
before the retrains. Speeds: one thread each, {args.runs} interleaved runs of ~2 s, median;
max |pair − onnxruntime| on the check batch at import: {result.max_abs_diff:.2e}.

{table}

Target ≥ 0.4× onnxruntime: what a replica serves {verdict(serve_med / ort_med)}, the literal
two-pass pair {verdict(pair_med / ort_med)}. Right after an import, a full retrain or a default
(readout-only) QK retrain, the estimator's layers below the readout are bit-identical to the
selector's, so the gated estimator's penultimate activations equal the selector's and one pass is
exact (`SharedTrunkForward`, verified against the two-pass forward at load). Only an estimator
whose hidden layers were retrained (`qk_epochs > 0`) needs both passes: two eager PyTorch passes
against onnxruntime's fused kernels.
"""
    print(md)
    if not args.no_write:
        write_section("import", md)


if __name__ == "__main__":
    main()
