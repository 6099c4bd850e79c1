"""Calibrate the structural-drift rule on retrain experiments: drift signals vs QK − full gap.

Reads every ``retrain_*.json`` written by ``skqk experiment retrain`` in a directory; for each
(data set, architecture, share of new data, shift) it lists the mean drift signals next to
the paired accuracy gap of the default QK retrain against the full warm-started retrain,
checks the :class:`~app.core.drift.DriftThresholds` rule against "QK fell short by more
than ``tolerance``", and plots gap against firing-rate ratio.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from app.core.drift import DriftThresholds
from app.experiments.report import FIG_DPI, markdown_table, mean_std, pyplot, save_figure


def collect(directory: Path, thresholds: DriftThresholds | None = None) -> list[dict[str, Any]]:
    thresholds = thresholds or DriftThresholds()
    groups: list[dict[str, Any]] = []
    for path in sorted(directory.glob("retrain_*.json")):
        payload = json.loads(path.read_text())
        if "qk_fast" not in payload["methods"] or "full_warm" not in payload["methods"]:
            continue
        keyed: dict[tuple[float, str], list[dict[str, Any]]] = {}
        for run in payload["runs"]:
            keyed.setdefault((run["new_fraction"], run["shift"]), []).append(run)
        for (nf, shift), runs in keyed.items():
            gap = [r["methods"]["qk_fast"]["test_acc"] - r["methods"]["full_warm"]["test_acc"] for r in runs]
            entry = {"dataset": payload["dataset"], "arch": payload["arch"], "new_fraction": nf,
                     "shift": shift, "seeds": len(runs), "gap": mean_std(gap),
                     # per seed, then the median: robust to a run slowed by other load
                     "speedup": float(np.median([r["methods"]["full_warm"]["wall_s"]
                                                 / max(r["methods"]["qk_fast"]["wall_s"], 1e-9)
                                                 for r in runs]))}
            for key in ("rate_ratio", "nn_ratio", "far_fraction", "volume_ratio"):
                entry[key] = mean_std([r["drift"][key] for r in runs])
            # re-decide with the current thresholds (the runs may predate them); majority of seeds
            votes = [thresholds.decide(r["drift"])[0] for r in runs]
            entry["recommend_full"] = sum(votes) * 2 > len(runs)
            groups.append(entry)
    return groups


def calibrate(directory: Path, tolerance: float = 0.003, out: Path | None = None) -> dict[str, Any]:
    thresholds = DriftThresholds()
    groups = collect(directory, thresholds)
    out = out or directory
    rows, agree = [], 0
    for g in groups:
        short = g["gap"][0] < -tolerance
        agree += int(short == g["recommend_full"])
        rows.append([f"{g['dataset']} / {g['arch']}", f"{g['new_fraction']:g}", g["shift"],
                     f"{g['rate_ratio'][0]:.1f}", f"{g['nn_ratio'][0]:.2f}", f"{g['far_fraction'][0]:.2f}",
                     f"{g['volume_ratio'][0]:.2f}",
                     f"{100 * g['gap'][0]:+.2f} ± {100 * g['gap'][1]:.2f}", f"{g['speedup']:.0f}×",
                     "full" if g["recommend_full"] else "qk", "short" if short else "ok"])
    md = [f"# Structural drift vs QK − full gap ({len(groups)} settings)\n",
          f"Rule (DriftThresholds): full if rate_ratio > {thresholds.rate_ratio}, nn_ratio > "
          f"{thresholds.nn_ratio}, far_fraction > {thresholds.far_fraction} or volume_ratio > "
          f"{thresholds.volume_ratio}. \"short\": QK below full by more than {100 * tolerance:.1f} points "
          f"(mean over seeds). Rule agrees with the outcome in {agree}/{len(groups)} settings.\n",
          markdown_table(["case", "new", "shift", "rate_ratio", "nn_ratio", "far", "volume",
                          "QK − full (points)", "QK speedup", "rule says", "QK outcome"], rows)]
    (out / "drift_calibration.md").write_text("\n".join(md) + "\n")
    if groups:
        plot(groups, out / "drift_calibration.png", thresholds)
    return {"groups": groups, "agree": agree}


def plot(groups: list[dict[str, Any]], path: Path, thresholds: DriftThresholds) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=FIG_DPI)
    markers = {"none": "o", "brightness": "s", "contrast": "^", "classfreq": "D"}
    for g in groups:
        kind = g["shift"].split(":")[0]
        color = "tab:red" if g["volume_ratio"][0] > thresholds.volume_ratio else "tab:blue"
        ax.errorbar(g["rate_ratio"][0], 100 * g["gap"][0], yerr=100 * g["gap"][1],
                    fmt=markers.get(kind, "o"), color=color, ms=5, capsize=2, alpha=0.8)
    ax.axvline(thresholds.rate_ratio, color="grey", ls="--", lw=1,
               label=f"rule: full when rate_ratio > {thresholds.rate_ratio}")
    ax.axhline(0, color="black", lw=0.6, label="QK = full warm")
    ax.legend(loc="lower left")
    ax.set_xscale("log")
    ax.set_xlabel("firing-rate ratio (new vs reference, 1 = same distribution)")
    ax.set_ylabel("QK − full warm (points)")
    ax.set_title("o none  ■ brightness  ▲ contrast  ◆ classfreq; red: new ≥ old·"
                 f"{thresholds.volume_ratio}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
