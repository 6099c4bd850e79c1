"""Exact explanations: /explain vs /predict over HTTP, and vs SHAP's KernelExplainer and Captum's
IntegratedGradients on the same model and rows.

Usage: ``nice -n 19 python bench/explain.py [--runs 3] [--seconds 3] [--shap-rows 8] [--no-write]``

The model is the README's walk-through: sklearn's breast cancer exported to CSV,
``skqk init --data`` (the default ``mlp:256-256``, 30 named features, normalisation learnt),
served by a real ``skqk serve`` (1 torch thread). Measured side by side in one run:

- rows/s of ``/predict`` and of ``/explain`` (predicted class, default reference), one client,
  requests of ``--batch`` rows, alternating, median of ``--runs``;
- per-row time of the in-process explanation (``app.serving.explaining.compute``), of
  ``shap.KernelExplainer`` (``nsamples="auto"``, one background row = the same reference, the
  fastest setting KernelSHAP has) and of ``captum`` ``IntegratedGradients`` (50 steps,
  baseline = the reference, batched over rows); all explain the "malignant" logit;
- how far their attributions are from the exact ones: ‖φ − exact‖₂ / ‖exact‖₂ per row
  (median), where exact = A(x)·(x − r), with r the training mean.

Results go to the ``explain`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import machine_info, markdown_table, write_section
from tests.helpers.server import REPO, ServerProcess, fast_env


def _cancer_csv(path: Path) -> list[str]:
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer(as_frame=True)
    frame: pd.DataFrame = d.frame.assign(
        diagnosis=d.target.map(dict(enumerate(d.target_names)))).drop(columns="target")
    frame.to_csv(path, index=False)
    return list(d.feature_names)


def _http_rate(client, path: str, bodies: list[dict], rows_per_body: int, seconds: float) -> float:
    client.post(path, json=bodies[0]).raise_for_status()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        client.post(path, json=bodies[done % len(bodies)]).raise_for_status()
        done += 1
    return done * rows_per_body / (time.perf_counter() - t0)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.median(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shap-rows", type=int, default=8)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import captum
    import httpx
    import shap
    from captum.attr import IntegratedGradients

    from app.serving.explaining import compute, default_reference
    from app.serving.models import load_model, schema_of
    from app.storage import open_store

    work = Path(tempfile.mkdtemp(prefix="skqk-bench-explain-"))
    names = _cancer_csv(work / "cancer.csv")
    data_dir = work / "data"
    env = fast_env(data_dir, SKQK_BOOTSTRAP_ARCH="mlp:256-256", SKQK_BOOTSTRAP_EPOCHS="30")
    subprocess.run([sys.executable, "-m", "app.cli", "init", "--data", str(work / "cancer.csv"),
                    "--label-column", "diagnosis", "--arch", "mlp:256-256"], cwd=REPO, env=env, check=True,
                   capture_output=True)
    store = open_store(f"sqlite:///{data_dir / 'skqk.db'}")
    model, record = load_model(store, 1)
    store.dispose()
    model.eval()
    schema = schema_of(record, model.spec)
    ref, source = default_reference(schema, model.spec)
    import pandas as pd

    x = pd.read_csv(work / "cancer.csv")[names].to_numpy(np.float32)

    # ---- HTTP: /predict vs /explain, same rows, same server, alternating ----------------------
    bodies = [{"inputs": x[i:i + args.batch].tolist()} for i in range(0, len(x) - args.batch, args.batch)]
    quick_bodies = [{**b, "radius": False} for b in bodies]
    predict_rates, explain_rates, quick_rates = [], [], []
    with ServerProcess(data_dir, env) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        for _ in range(args.runs):
            predict_rates.append(_http_rate(c, "/predict", bodies, args.batch, args.seconds))
            explain_rates.append(_http_rate(c, "/explain", bodies, args.batch, args.seconds))
            quick_rates.append(_http_rate(c, "/explain", quick_bodies, args.batch, args.seconds))
    predict_rps, explain_rps = statistics.median(predict_rates), statistics.median(explain_rates)
    quick_rps = statistics.median(quick_rates)

    # ---- per-row cost and exactness: ours vs KernelSHAP vs Integrated Gradients ------------------
    target = 1  # the "malignant" logit
    which = np.asarray([target])

    def ours(rows: np.ndarray, radius: bool = True):
        return compute(model, schema, 1, rows, ref, source, which, radius)

    ours(x[:64])
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        e = ours(x[:256])
        times.append((time.perf_counter() - t0) / 256)
    ours_s = statistics.median(times)
    quick_times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        ours(x[:256], radius=False)
        quick_times.append((time.perf_counter() - t0) / 256)
    quick_s = statistics.median(quick_times)
    exact = e.contributions[:, 0, :]

    rows = x[:args.shap_rows]

    def f(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(batch, dtype=np.float32))).numpy()[:, target]

    explainer = shap.KernelExplainer(f, ref[None, :].astype(np.float32))
    t0 = time.perf_counter()
    phi_shap = np.asarray(explainer.shap_values(rows, nsamples="auto", silent=True))
    shap_s = (time.perf_counter() - t0) / len(rows)

    ig = IntegratedGradients(lambda t: model(t))
    inputs = torch.from_numpy(x[:256]).requires_grad_(True)
    baseline = torch.from_numpy(ref.astype(np.float32))[None, :].expand_as(inputs)
    ig_times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        phi_ig = ig.attribute(inputs, baselines=baseline, target=target, n_steps=50).detach().numpy()
        ig_times.append((time.perf_counter() - t0) / 256)
    ig_s = statistics.median(ig_times)

    dist_shap = _rel(phi_shap, exact[:len(rows)])
    dist_ig = _rel(phi_ig, exact)
    # identity of ours, as served: value = intercept + Σ contributions (float64 sum of float32 maps)
    gap = np.abs(e.intercept[:, 0] + exact.sum(1) - e.output_values()[:, 0]).max()

    ratio_predict = predict_rps / explain_rps
    ratio_quick = predict_rps / quick_rps
    speed_shap = shap_s / ours_s
    table = markdown_table(
        ["method", "time per row", "vs exact (median rel. L2)", "notes"],
        [["/predict over HTTP", f"{1e6 / predict_rps:.0f} µs ({predict_rps:,.0f} rows/s)", "–",
          f"{args.batch} rows per request, one client"],
         ["/explain over HTTP", f"{1e6 / explain_rps:.0f} µs ({explain_rps:,.0f} rows/s)", "0 (exact)",
          "same requests, same server"],
         ["/explain radius=false over HTTP", f"{1e6 / quick_rps:.0f} µs ({quick_rps:,.0f} rows/s)",
          "0 (exact)", "same requests; contributions only"],
         ["explain in process", f"{ours_s * 1e6:.0f} µs", f"identity gap {gap:.1e}", "256 rows at once"],
         ["explain in process, radius=false", f"{quick_s * 1e6:.0f} µs", "0 (exact)", "256 rows at once"],
         ["shap KernelExplainer", f"{shap_s * 1e3:.1f} ms", f"{dist_shap:.3f}",
          f"nsamples=auto, 1 background row (= r), {len(rows)} rows"],
         ["captum IntegratedGradients", f"{ig_s * 1e6:.0f} µs", f"{dist_ig:.3f}", "50 steps, baseline r, "
                                                                                 "256 rows batched"]])
    verdict_shap = "met" if speed_shap >= 100 else "missed"
    verdict_predict = "met" if ratio_predict <= 3 else "missed"
    text = f"""## Exact explanations (`bench/explain.py`)

{machine_info()}; shap {shap.__version__}, captum {captum.__version__}; runs: {args.runs} × {args.seconds:g} s
(median). Model: breast cancer CSV → `skqk init --data` (mlp:256-256, 30 features, normalised);
reference r = training mean ({source}); all methods explain the "malignant" logit.

{table}

- /explain vs /predict rows/s: {ratio_predict:.2f}× slower (target ≤ 3×: {verdict_predict}); with
  `"radius": false` {ratio_quick:.2f}×. The certified radius needs the gradient of every hidden unit
  (D × units per row: here 30 × 256 × 256 multiply-adds for the second layer, ~27× a forward pass),
  which a sampling explainer never computes; the contributions alone cost one reverse pass per output.
- in-process explanation (with the radius) vs KernelSHAP per row: {speed_shap:,.0f}× faster (target ≥ 100×:
  {verdict_shap}); without the radius {shap_s / quick_s:,.0f}×.
- Distances: KernelSHAP (one baseline row) estimates Shapley values of f(x_S, r_rest), IG integrates
  the gradient along r → x; both cross gate boundaries on the way, so neither equals the local
  affine map A(x)·(x − r) that the served model *is* within the certified radius around x.
"""
    print(text)
    if not args.no_write:
        write_section("explain", text)


if __name__ == "__main__":
    main()
