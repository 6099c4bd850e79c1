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
from app.core.refresh import choose_mode
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


def collect_modes(directory: Path) -> list[dict[str, Any]]:
    """Per setting with a ``refresh`` run: QK / refresh / full warm on the new distribution, refresh's
    speed, and the mode ``auto`` picks (:func:`app.core.refresh.choose_mode`, majority of seeds)."""
    groups: list[dict[str, Any]] = []
    for path in sorted(directory.glob("retrain_*.json")):
        payload = json.loads(path.read_text())
        if not {"qk_fast", "refresh", "full_warm"} <= set(payload["methods"]):
            continue
        keyed: dict[tuple[float, str], list[dict[str, Any]]] = {}
        for run in payload["runs"]:
            keyed.setdefault((run["new_fraction"], run["shift"]), []).append(run)
        for (nf, shift), runs in keyed.items():
            def acc(method: str, key: str = "test_acc", rows: list[dict[str, Any]] = runs) -> list[float]:
                return [r["methods"][method][key] for r in rows]

            full, qk, refresh = acc("full_warm"), acc("qk_fast"), acc("refresh")
            picks = [choose_mode(r["drift"])[0] for r in runs]
            entry = {"dataset": payload["dataset"], "arch": payload["arch"], "new_fraction": nf,
                     "shift": shift, "seeds": len(runs),
                     "rate_ratio": mean_std([r["drift"]["rate_ratio"] for r in runs]),
                     "qk_gap": mean_std(np.subtract(qk, full)),
                     "refresh_gap": mean_std(np.subtract(refresh, full)),
                     "refresh_vs_qk": mean_std(np.subtract(refresh, qk)),
                     "refresh_speedup": float(np.median([r["methods"]["full_warm"]["wall_s"]
                                                         / max(r["methods"]["refresh"]["wall_s"], 1e-9)
                                                         for r in runs])),
                     "auto": max(set(picks), key=picks.count)}
            groups.append(entry)
    return groups


def calibrate_modes(directory: Path, tolerance: float = 0.003, out: Path | None = None) -> dict[str, Any]:
    """Was auto's pick within ``tolerance`` of the best of qk / refresh / full warm (mean over seeds)?"""
    out = out or directory
    groups = collect_modes(directory)
    rows, agree = [], 0
    for g in groups:
        means = {"qk": g["qk_gap"][0], "refresh": g["refresh_gap"][0], "full": 0.0}
        ok = means[g["auto"]] >= max(means.values()) - tolerance
        agree += int(ok)
        rows.append([f"{g['dataset']} / {g['arch']}", f"{g['new_fraction']:g}", g["shift"],
                     f"{g['rate_ratio'][0]:.1f}", f"{100 * g['qk_gap'][0]:+.2f} ± {100 * g['qk_gap'][1]:.2f}",
                     f"{100 * g['refresh_gap'][0]:+.2f} ± {100 * g['refresh_gap'][1]:.2f}",
                     f"{g['refresh_speedup']:.1f}×", g["auto"], "ok" if ok else "miss"])
    md = [f"# Retrain modes: qk / refresh / full warm ({len(groups)} settings)\n",
          f"Gaps on the new distribution vs full warm (paired, mean ± std over seeds). auto = "
          f"app.core.refresh.choose_mode on each seed's drift (majority). \"ok\": auto's mode is within "
          f"{100 * tolerance:.1f} points of the best of the three; {agree}/{len(groups)} ok.\n",
          markdown_table(["case", "new", "shift", "rate_ratio", "QK − full", "refresh − full",
                          "refresh speedup vs full", "auto", "auto outcome"], rows)]
    (out / "mode_calibration.md").write_text("\n".join(md) + "\n")
    if groups:
        plot_modes(groups, out / "mode_calibration.png")
    return {"groups": groups, "agree": agree}


def plot_modes(groups: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=FIG_DPI)
    for i, g in enumerate(groups):
        x = g["rate_ratio"][0]
        for key, color, label in (("qk_gap", "tab:red", "QK − full warm"), ("refresh_gap", "tab:green",
                                                                           "refresh − full warm")):
            ax.errorbar(x, 100 * g[key][0], yerr=100 * g[key][1], fmt="o", color=color, ms=5, capsize=2,
                        alpha=0.8, label=label if i == 0 else None)
        ax.annotate(f"{g['arch'].split('-')[0]} {g['shift']}", (x, 100 * g["refresh_gap"][0]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="black", lw=0.6)
    ax.axhline(-0.5, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("firing-rate ratio (new vs reference, 1 = same distribution)")
    ax.set_ylabel("accuracy gap vs full warm (points, new distribution)")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
