"""Benchmark: default QK retrain vs full warm-started retrain, side by side, same data.

For each case (data set × architecture) and each share of new data, per seed: train the
current net on the old data (not timed), then time on old + new data, back to back and in
alternating order (so machine load hits both alike):

* ``full_warm`` — ``train_full`` from the current net, default ``TrainConfig`` (Adam 1e-3,
  batch 128, early stopping on the validation loss with patience 5, best weights restored),
  no stability tracking;
* ``qk`` — ``train_qk`` with the default ``TrainConfig`` (solver "fast"), selector frozen,
  structure computation included;
* optionally ``qk_adam`` — ``train_qk`` with ``qk_solver="adam"`` (the previous default).

Both see the same training rows and the same validation split; each uses the validation
split for its own stopping/acceptance rule and never sees the test split. Wall time is
measured around the whole call. Also reported: the full retrain's time to its best epoch (a
lower bound no patience rule could beat without knowing the future).

    python3 -m bench.retrain                       # all cases, 5 seeds, writes BENCHMARKS.md
    python3 -m bench.retrain --cases mnist5k:mlp:256-256 --seeds 2 --no-write
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import time
from typing import Any

import torch

from app.core.data import load_dataset
from app.core.network import DecoupledModel
from app.core.spec import resolve_arch
from app.core.training import TrainConfig, evaluate, train_full, train_qk
from app.experiments.retrain import train_old
from app.experiments.scenario import build_scenario
from bench.report import machine_info, markdown_table, write_section

DEFAULT_CASES = ("mnist5k:mlp:256-256", "mnist5k:lenet5", "synthetic:mlp:256-256")


def _acc(forward, split) -> float:
    return evaluate(lambda x, _r: forward(x), split)[1]


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run_case(dataset: str, arch: str, seed: int, new_fraction: float, synthetic_n: int,
             with_adam: bool) -> dict[str, Any]:
    data = load_dataset(dataset, seed=seed, synthetic_n=synthetic_n)
    spec = resolve_arch(arch, data.input_dim, data.num_classes)
    cfg = TrainConfig(seed=seed)
    scenario = build_scenario(data, new_fraction, "none", seed)
    net = train_old(scenario.old, data.val, spec, cfg, seed)
    combined, val, test = scenario.combined, scenario.val, scenario.test
    row: dict[str, Any] = {"seed": seed, "n_old": len(scenario.old), "n_new": len(scenario.new),
                           "none_acc": _acc(net, test), "load_start": _load()}

    def full() -> None:
        model = copy.deepcopy(net)
        t0 = time.perf_counter()
        result = train_full(model, combined, val, cfg, track_stability=False)
        row["full_s"] = time.perf_counter() - t0
        row["full_acc"] = _acc(model, test)
        row["full_epochs"] = len(result.history)
        row["full_best_epoch"] = result.best_epoch
        row["full_to_best_s"] = sum(h["seconds"] for h in result.history[:result.best_epoch])

    def qk(solver: str) -> None:
        model = DecoupledModel.from_net(net)
        before = {k: v.clone() for k, v in model.selector.state_dict().items()}
        t0 = time.perf_counter()
        result = train_qk(model, combined, val, dataclasses.replace(cfg, qk_solver=solver))
        key = "qk" if solver == "fast" else "qk_adam"
        row[f"{key}_s"] = time.perf_counter() - t0
        row[f"{key}_acc"] = _acc(model, test)
        row[f"{key}_structure_s"] = result.structure_s
        row[f"{key}_best_epoch"] = result.best_epoch
        assert all(torch.equal(v, before[k]) for k, v in model.selector.state_dict().items())

    jobs = [full, lambda: qk("fast")] + ([lambda: qk("adam")] if with_adam else [])
    for job in (jobs if seed % 2 == 0 else jobs[::-1]):
        job()
    row["load_end"] = _load()
    return row


def summarise(rows: list[dict[str, Any]], with_adam: bool) -> dict[str, Any]:
    def ms(key: str) -> tuple[float, float]:
        vals = [r[key] for r in rows]
        return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0

    out = {k: ms(k) for k in ("none_acc", "full_acc", "qk_acc", "full_s", "qk_s", "full_to_best_s",
                              "qk_structure_s", "full_epochs")}
    out["delta"] = ms_list([r["qk_acc"] - r["full_acc"] for r in rows])
    out["speedup"] = out["full_s"][0] / out["qk_s"][0]
    out["speedup_to_best"] = out["full_to_best_s"][0] / out["qk_s"][0]
    out["target_met"] = out["delta"][0] >= -0.003 and out["speedup"] >= 3.0
    if with_adam:
        out["qk_adam_acc"], out["qk_adam_s"] = ms("qk_adam_acc"), ms("qk_adam_s")
    return out


def ms_list(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def markdown(results: list[dict[str, Any]], seeds: int, synthetic_n: int, with_adam: bool) -> str:
    head = ["case", "new data", "n old + m new", "no retrain %", "full warm %", "QK (fast) %",
            "Δ QK − full (paired)", "full s", "QK s", "speedup", "vs full's time-to-best", "target"]
    rows = []
    for r in results:
        s = r["summary"]
        first = r["rows"][0]
        rows.append([r["case"], f"{r['new_fraction']:g}", f"{first['n_old']} + {first['n_new']}",
                     f"{100 * s['none_acc'][0]:.2f}",
                     f"{100 * s['full_acc'][0]:.2f} ± {100 * s['full_acc'][1]:.2f}",
                     f"{100 * s['qk_acc'][0]:.2f} ± {100 * s['qk_acc'][1]:.2f}",
                     f"{100 * s['delta'][0]:+.2f} ± {100 * s['delta'][1]:.2f}",
                     f"{s['full_s'][0]:.2f}", f"{s['qk_s'][0]:.3f}", f"{s['speedup']:.1f}×",
                     f"{s['speedup_to_best']:.1f}×", "met" if s["target_met"] else "missed"])
    text = [
        "## QK retrain vs full warm-started retrain (bench/retrain.py)",
        "",
        f"Machine: {machine_info()}",
        "",
        f"{seeds} seeds per row (mean ± std); test accuracy on the held-out test split. Per seed the "
        "current net is trained on the old data (first 1 − m/(n+m) of the training split, not timed); "
        "then, back to back in alternating order, a full retrain warm-started from it (default "
        "TrainConfig: Adam 1e-3, batch 128, early stopping on validation loss with patience 5, best "
        "weights restored) and the default QK retrain (`train_qk`, solver \"fast\": one pass for the "
        "gated features + convex readout refit, early-stopped along its path on the validation loss) "
        "run on the same n + m rows with the same validation split. Wall time around the whole call, "
        f"structure computation included. Synthetic: {synthetic_n} samples (70 % train), 64 features, "
        "teacher labels. "
        "\"vs full's time-to-best\": the full retrain's time up to its best epoch only (a bound no "
        "early-stopping rule reaches). Target: Δ ≥ −0.3 points and speedup ≥ 3×.",
        "",
        markdown_table(head, rows),
    ]
    if with_adam:
        adam_rows = []
        for r in results:
            acc, secs = r["summary"]["qk_adam_acc"], r["summary"]["qk_adam_s"]
            adam_rows.append([r["case"], f"{r['new_fraction']:g}",
                              f"{100 * acc[0]:.2f} ± {100 * acc[1]:.2f}", f"{secs[0]:.2f}"])
        text += ["", "Previous default for reference (`qk_solver=\"adam\"`: Adam epochs on every "
                 "estimator weight, same early stopping):", "",
                 markdown_table(["case", "new data", "QK Adam %", "QK Adam s"], adam_rows)]
    if any(not r["summary"]["target_met"] for r in results):
        text += ["", "Rows marked \"missed\": the QK retrain is far faster but less accurate. There the new "
                 "data is as large as the old, so the structure learned on the old data is the limit: "
                 "QK retrains by Adam epochs on every estimator weight fall short as well (docs/"
                 "EXPERIMENTS.md, \"The fast QK solver\"), and the structural-drift rule "
                 "(app/core/drift.py, volume_ratio > 0.6) recommends `mode=full` for exactly these cases."]
    loads = [x for r in results for row in r["rows"] for x in (row["load_start"], row["load_end"])]
    text += ["", f"1-minute load average during the runs: {min(loads):.1f}–{max(loads):.1f} "
             "(2 cores, shared; timings of one row are side by side, so load hits both columns)."]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help="comma-separated dataset:arch, e.g. mnist5k:lenet5")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--new-fractions", default="0.2,0.5")
    parser.add_argument("--synthetic-n", type=int, default=120_000)
    parser.add_argument("--with-adam", action="store_true", help="also time qk_solver='adam'")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    results = []
    for case in [c for c in args.cases.split(",") if c]:
        dataset, arch = case.split(":", 1)
        for nf in [float(v) for v in args.new_fractions.split(",")]:
            rows = []
            for seed in range(args.seeds):
                rows.append(run_case(dataset, arch, seed, nf, args.synthetic_n, args.with_adam))
                r = rows[-1]
                print(f"{case} new={nf:g} seed={seed}: full {100 * r['full_acc']:.2f}% {r['full_s']:.2f}s"
                      f" | qk {100 * r['qk_acc']:.2f}% {r['qk_s']:.3f}s | load {r['load_start']:.1f}",
                      flush=True)
            results.append({"case": case, "new_fraction": nf, "rows": rows,
                            "summary": summarise(rows, args.with_adam)})
    md = markdown(results, args.seeds, args.synthetic_n, args.with_adam)
    print(md)
    if not args.no_write:
        write_section("retrain", md)


if __name__ == "__main__":
    main()
