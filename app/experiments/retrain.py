"""Hypothesis 2: with SK frozen, retraining QK alone on old + new data recovers the accuracy.

The paper's four steps per seed: (1) train a ReLU net on the old data (n samples); (2) copy
it into a frozen selector and an estimator; (3)+(4) on old + new data (n + m samples),
compare:

* ``none`` — keep the current net;
* ``full_warm`` — full retrain warm-started from the current net (``train_full``);
* ``full_scratch`` — full retrain from a fresh random init;
* ``qk_fast`` — the default QK retrain (``train_qk``, solver "fast": convex readout refit);
* ``qk_adam`` — QK retrain by Adam epochs on every estimator weight (solver "adam");
* ``qk_random`` — QK retrain by Adam from a random estimator init (the selector stays).
* ``refresh`` — ``mode=refresh`` (:mod:`app.core.refresh`): the lowest drifted layer (per-layer
  firing-rate ratio of the drift report) and the readout re-learnt for a small budget, then the
  readout refit on the new frozen structure; its wall time includes the drift measurement
  that picks the layer.

Accuracy is reported on the new distribution's test split, on the old one, and on both
together (``test_combined_acc``: the service keeps seeing some old traffic). Each row also
records what ``mode=auto`` would have chosen (:func:`app.core.refresh.choose_mode`).

Every method uses the same data, the same validation split (early stopping / acceptance),
the default :class:`TrainConfig`. Wall times are measured around the whole call (structure
computation included); the time-to-accuracy curves exclude the time spent evaluating the
test set after each epoch. For each shift the structural drift of the new data
(:func:`app.core.drift.structural_drift`) is recorded next to the QK − full accuracy gap.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.data import Split, load_dataset
from app.core.drift import structural_drift
from app.core.network import DecoupledModel, Estimator, PathSelector, ReLUNet
from app.core.refresh import RefreshConfig, choose_layers, choose_mode, refresh_retrain, start_net
from app.core.spec import resolve_arch
from app.core.training import TrainConfig, evaluate, train_full, train_qk
from app.experiments.report import (
    FIG_DPI,
    markdown_table,
    mean_std,
    pm,
    pyplot,
    save_figure,
    slug,
    write_json,
)
from app.experiments.scenario import Scenario, build_scenario

METHODS = ("none", "full_warm", "full_scratch", "qk_fast", "qk_adam", "qk_random", "refresh")
COLORS = {"none": "grey", "full_warm": "tab:blue", "full_scratch": "tab:cyan", "qk_fast": "tab:red",
          "qk_adam": "tab:orange", "qk_random": "tab:brown", "refresh": "tab:green"}


def _accuracy(forward: Callable[[torch.Tensor], torch.Tensor], split: Split) -> float:
    return evaluate(lambda x, _rows: forward(x), split)[1]


class Curve:
    """Collects (seconds excluding evaluation, test accuracy) after every epoch/stage."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], test: Split) -> None:
        self.forward, self.test = forward, test
        self.start = time.perf_counter()
        self.excluded = 0.0
        self.points: list[tuple[float, float]] = []

    def __call__(self, _metrics: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        elapsed = t0 - self.start - self.excluded
        self.points.append((elapsed, _accuracy(self.forward, self.test)))
        self.excluded += time.perf_counter() - t0


def _refresh(net: ReLUNet, scenario: Scenario, cfg: TrainConfig, seed: int, curves: bool,
             refresh: RefreshConfig) -> tuple[torch.nn.Module, float, dict[str, Any]]:
    """``refresh``: drift (picks the layer), the refresh epochs, the readout refit; timed."""
    test = scenario.test.to(next(net.parameters()).device)
    model = DecoupledModel.from_net(net)
    start = start_net(model)
    curve = Curve(start, test) if curves else None
    t0 = time.perf_counter()
    drift = structural_drift(model.selector, scenario.old.x, scenario.new.x, seed=seed)
    layers, why = choose_layers(drift.layers, refresh.layer_ratio, refresh.max_layers)
    is_new = torch.arange(len(scenario.combined)) >= len(scenario.old)
    on_epoch = (lambda m: curve(m) if m.get("stage") != "readout" else None) if curve else None
    candidate, result = refresh_retrain(model, scenario.combined, scenario.val, cfg, layers, refresh,
                                        on_epoch, is_new=is_new, start=start)
    wall = time.perf_counter() - t0 - (curve.excluded if curve else 0.0)
    candidate.eval()
    points = curve.points if curve else []
    if curves:
        points = [*points, (wall, _accuracy(candidate, test))]
    info = {"epochs_run": sum(1 for h in result.history if h.get("stage") != "readout"),
            "best_epoch": result.best_epoch, "layers": layers, "layers_reason": why, "curve": points}
    return candidate, wall, info


def run_method(method: str, net: ReLUNet, scenario: Scenario, cfg: TrainConfig, seed: int,
               curves: bool = True, refresh: RefreshConfig | None = None) -> dict[str, Any]:
    """One retrain of ``method`` on scenario.old + scenario.new; returns accuracies and times.

    Warm-started curves begin at (0 s, accuracy of the current net).
    """
    device = next(net.parameters()).device
    combined = scenario.combined
    test, test_old, val = scenario.test.to(device), scenario.test_old.to(device), scenario.val
    spec = net.spec
    if method == "none":
        model: torch.nn.Module = net
        forward = net
        wall, info = 0.0, {}
    elif method in ("full_warm", "full_scratch"):
        model = copy.deepcopy(net) if method == "full_warm" else ReLUNet(spec, seed=seed + 1000).to(device)
        forward = model
        curve = Curve(forward, test) if curves else None
        t0 = time.perf_counter()
        result = train_full(model, combined, val, cfg, on_epoch=curve, track_stability=False)
        wall = time.perf_counter() - t0 - (curve.excluded if curve else 0.0)
        info = {"epochs_run": len(result.history), "best_epoch": result.best_epoch,
                "curve": curve.points if curve else []}
    elif method in ("qk_fast", "qk_adam", "qk_random"):
        if method == "qk_random":
            model = DecoupledModel(PathSelector(net), Estimator(ReLUNet(spec, seed=seed + 2000)))
        else:
            model = DecoupledModel.from_net(net)
        model.to(device)
        qcfg = dataclasses.replace(cfg, qk_solver="fast" if method == "qk_fast" else "adam")
        forward = model
        curve = Curve(forward, test) if curves else None
        t0 = time.perf_counter()
        result = train_qk(model, combined, val, qcfg, on_epoch=curve)
        wall = time.perf_counter() - t0 - (curve.excluded if curve else 0.0)
        info = {"epochs_run": len(result.history), "best_epoch": result.best_epoch,
                "structure_s": result.structure_s, "curve": curve.points if curve else []}
    elif method == "refresh":
        model, wall, info = _refresh(net, scenario, cfg, seed, curves, refresh or RefreshConfig())
        forward = model
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    model.eval()
    with torch.no_grad():
        acc, acc_old = _accuracy(forward, test), _accuracy(forward, test_old)
        acc_both = _accuracy(forward, Split.concat([test, test_old]))
    if method in ("full_warm", "qk_fast", "qk_adam", "refresh") and curves:
        info["curve"] = [(0.0, _accuracy(net, test)), *info["curve"]]
    return {"method": method, "test_acc": acc, "test_old_acc": acc_old, "test_combined_acc": acc_both,
            "wall_s": wall, **info}


def train_old(data_old: Split, val: Split, spec, cfg: TrainConfig, seed: int) -> ReLUNet:
    net = ReLUNet(spec, seed=seed)
    train_full(net, data_old, val, dataclasses.replace(cfg, seed=seed), track_stability=False)
    net.eval()
    return net


def run_retrain(dataset: str, arch: str, seeds: int, new_fractions: list[float], shifts: list[str],
                out: Path, methods: list[str] | None = None, cfg: TrainConfig | None = None,
                synthetic_n: int = 20_000, log=print) -> dict[str, Any]:
    methods = list(methods or METHODS)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
    base_cfg = cfg or TrainConfig()
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    arch_name = arch
    for seed in range(seeds):
        data = load_dataset(dataset, seed=seed, synthetic_n=synthetic_n)
        spec = resolve_arch(arch, data.input_dim, data.num_classes)
        arch_name = spec.name
        cfg_s = dataclasses.replace(base_cfg, seed=seed)
        for nf in new_fractions:
            old_only = build_scenario(data, nf, "none", seed)
            t0 = time.perf_counter()
            net = train_old(old_only.old, data.val, spec, cfg_s, seed)
            log(f"retrain {dataset} seed {seed} new={nf:g}: initial net on {len(old_only.old)} samples "
                f"({time.perf_counter() - t0:.1f}s)")
            for shift in shifts:
                scenario = build_scenario(data, nf, shift, seed)
                drift = structural_drift(PathSelector(net), scenario.old.x, scenario.new.x, seed=seed)
                row: dict[str, Any] = {"seed": seed, "new_fraction": nf, "shift": shift,
                                       "n_old": len(scenario.old), "n_new": len(scenario.new),
                                       "drift": drift.to_dict(), "methods": {},
                                       "auto": choose_mode(drift.to_dict())[0]}
                for method in methods:
                    row["methods"][method] = run_method(method, net, scenario, cfg_s, seed)
                runs.append(row)
                log(f"  shift={shift}: " + ", ".join(
                    f"{m}={100 * r['test_acc']:.1f}%/{r['wall_s']:.1f}s" for m, r in row["methods"].items()))
    summary = summarise(runs, methods)
    name = slug(f"retrain_{dataset}_{arch_name}")
    payload = {"dataset": dataset, "arch": arch_name, "seeds": seeds, "new_fractions": new_fractions,
               "shifts": shifts, "methods": methods, "config": vars(base_cfg), "summary": summary,
               "runs": runs}
    write_json(out / f"{name}.json", payload)
    plots = []
    for nf in new_fractions:
        png = f"{name}_new{nf:g}.png"
        plot_time_to_accuracy([r for r in runs if r["new_fraction"] == nf], methods, shifts,
                              f"{dataset} / {arch_name}, new data = {nf:g} of train", out / png)
        plots.append(png)
    (out / f"{name}.md").write_text(markdown(payload, plots))
    return payload


def summarise(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["new_fraction"], r["shift"]), []).append(r)
    out = []
    for (nf, shift), rows in groups.items():
        entry: dict[str, Any] = {"new_fraction": nf, "shift": shift, "seeds": len(rows), "methods": {}}
        for m in methods:
            acc = [r["methods"][m]["test_acc"] for r in rows]
            entry["methods"][m] = {
                "test_acc": mean_std(acc), "test_old_acc": mean_std([r["methods"][m]["test_old_acc"]
                                                                    for r in rows]),
                "test_combined_acc": mean_std([r["methods"][m].get("test_combined_acc", float("nan"))
                                               for r in rows]),
                "wall_s": mean_std([r["methods"][m]["wall_s"] for r in rows])}
            if "full_warm" in methods and m != "full_warm":
                diff = [r["methods"][m]["test_acc"] - r["methods"]["full_warm"]["test_acc"] for r in rows]
                entry["methods"][m]["delta_vs_full_warm"] = mean_std(diff)
                # per seed, then the median: one run slowed by other load must not set the figure
                full_s = [r["methods"]["full_warm"]["wall_s"] for r in rows]
                own_s = [max(r["methods"][m]["wall_s"], 1e-9) for r in rows]
                entry["methods"][m]["speed_vs_full_warm"] = float(np.median(np.divide(full_s, own_s)))
        for key in ("nn_ratio", "far_fraction", "rate_ratio", "volume_ratio"):
            entry[key] = mean_std([r["drift"][key] for r in rows])
        entry["recommend_full_votes"] = sum(bool(r["drift"]["recommend_full"]) for r in rows)
        layer_ratios = [[float(x["rate_ratio"]) for x in r["drift"].get("layers", [])] for r in rows]
        entry["layer_rate_ratios"] = [float(np.mean(col)) for col in zip(*layer_ratios, strict=True)]
        autos = [r.get("auto", "") for r in rows]
        entry["auto"] = max(set(autos), key=autos.count)  # the majority over seeds
        out.append(entry)
    return out


def plot_time_to_accuracy(runs: list[dict[str, Any]], methods: list[str], shifts: list[str], title: str,
                          path: Path) -> None:
    plt = pyplot()
    panels = [s for s in shifts if any(r["shift"] == s for r in runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), dpi=FIG_DPI, squeeze=False)
    for ax, shift in zip(axes[0], panels, strict=True):
        rows = [r for r in runs if r["shift"] == shift]
        baselines: list[tuple[str, str, float]] = []
        spans: list[float] = []  # the methods' mean ± std: what the y axis is for
        for m in methods:
            color = COLORS.get(m, "black")
            for r in rows:
                curve = r["methods"][m].get("curve") or []
                if len(curve) > 1:
                    ax.plot([p[0] for p in curve], [100 * p[1] for p in curve], color=color,
                            alpha=0.25, lw=0.8)
            t = np.array([r["methods"][m]["wall_s"] for r in rows])
            a = [100 * r["methods"][m]["test_acc"] for r in rows]
            if np.median(t) <= 0:  # nothing trained ("none"): its accuracy is the baseline
                baselines.append((m, color, float(np.mean(a))))
                continue
            lo, mid, hi = np.percentile(t, [0, 50, 100])  # median time, whiskers to min and max
            ax.errorbar(mid, np.mean(a), xerr=[[mid - lo], [hi - mid]], yerr=np.std(a), fmt="o", color=color,
                        ms=5, capsize=2, label=m)
            spans += [float(np.mean(a) - np.std(a)), float(np.mean(a) + np.std(a))]
        _baseline_lines(ax, baselines, spans)
        ax.set_xscale("log")  # times span 0.05–10 s; a time is never negative
        ax.set_xlabel("wall time (s)")
        ax.set_title(f"shift: {shift}")
        ax.legend(loc="best")  # in every panel: each is read on its own; where it hides no point
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _baseline_lines(ax: Any, baselines: list[tuple[str, str, float]], spans: list[float]) -> None:
    """The "no retrain" accuracy as a dashed line, labelled with its value. The y axis is the
    methods' (mean ± std, a margin around): a baseline far below them (a brightness shift: ~60 %
    against ~95 %) would squash them into a sliver, so it is drawn only when it falls inside, and
    otherwise named in the legend with its value."""
    if not spans:
        for m, color, acc in baselines:
            ax.axhline(acc, color=color, ls="--", lw=1, label=f"{m} (no retrain): {acc:.1f} %")
        return
    lo, hi = min(spans), max(spans)
    margin = max(0.5, 0.15 * (hi - lo))
    bottom, top = lo - margin, hi + margin
    for _m, _color, acc in baselines:
        if bottom - margin <= acc <= top + margin:  # close by: widen a little and draw it
            bottom, top = min(bottom, acc - margin / 2), max(top, acc + margin / 2)
    ax.set_ylim(bottom, top)
    for m, color, acc in baselines:
        if bottom <= acc <= top:
            ax.axhline(acc, color=color, ls="--", lw=1, label=f"{m} (no retrain): {acc:.1f} %")
        else:
            where = "below" if acc < bottom else "above"  # named in the legend, not drawn
            ax.plot([], [], color=color, ls="--", lw=1,
                    label=f"{m} (no retrain): {acc:.1f} %, {where} this axis")


def summary_table(payload: dict[str, Any]) -> str:
    """One row per (share of new data, shift): accuracy of every method, QK gap, speed, drift."""
    methods = payload["methods"]
    head = ["new", "shift", *methods]
    versus = [m for m in ("qk_fast", "refresh") if m in methods and "full_warm" in methods]
    for m in versus:
        head += [f"{m} − full warm (paired)", f"{m} speed (median of seeds)"]
    if "refresh" in methods:
        head += ["refresh combined", "full warm combined", "QK combined"]
    head += ["rate_ratio (per layer)", "volume", "auto"]
    rows = []
    for entry in payload["summary"]:
        e = entry["methods"]
        row = [f"{entry['new_fraction']:g}", entry["shift"]]
        row += [f"{100 * e[m]['test_acc'][0]:.2f} ± {100 * e[m]['test_acc'][1]:.2f}" for m in methods]
        for m in versus:
            d = e[m]["delta_vs_full_warm"]
            row += [f"{100 * d[0]:+.2f} ± {100 * d[1]:.2f}", f"{e[m]['speed_vs_full_warm']:.1f}×"]
        if "refresh" in methods:
            row += [f"{100 * e[m]['test_combined_acc'][0]:.2f}" if m in e else "–"
                    for m in ("refresh", "full_warm", "qk_fast")]
        per_layer = "/".join(f"{v:.1f}" for v in entry.get("layer_rate_ratios", []))
        row += [f"{entry['rate_ratio'][0]:.1f}" + (f" ({per_layer})" if per_layer else ""),
                f"{entry['volume_ratio'][0]:.2f}", entry.get("auto", "")]
        rows.append(row)
    return markdown_table(head, rows)


def markdown(payload: dict[str, Any], plots: list[str]) -> str:
    methods = payload["methods"]
    lines = [f"# Hypothesis 2 — QK-only retrain on {payload['dataset']} / {payload['arch']}\n",
             f"{payload['seeds']} seeds; accuracy on the new distribution's test set (mean ± std, %), "
             "old test set in the next column; wall time includes the structure computation.\n",
             summary_table(payload), ""]
    for entry in payload["summary"]:
        lines.append(f"\n### new data = {entry['new_fraction']:g} of train, shift = {entry['shift']}\n")
        rows = []
        for m in methods:
            e = entry["methods"][m]
            t = e["wall_s"][0]
            speed = f"{e['speed_vs_full_warm']:.1f}×" if m != "none" and "speed_vs_full_warm" in e else "–"
            delta = e.get("delta_vs_full_warm")
            rows.append([m, f"{100 * e['test_acc'][0]:.2f} ± {100 * e['test_acc'][1]:.2f}",
                         f"{100 * e['test_old_acc'][0]:.2f}", f"{100 * e['test_combined_acc'][0]:.2f}",
                         f"{t:.2f}", speed,
                         f"{100 * delta[0]:+.2f} ± {100 * delta[1]:.2f}" if delta else "–"])
        lines.append(markdown_table(["method", "test acc % (new dist.)", "old test %", "combined %", "wall s",
                                     "speed vs full_warm", "Δ vs full_warm (paired)"], rows))
        lines.append(f"\ndrift: nn_ratio {entry['nn_ratio'][0]:.2f}, far_fraction "
                     f"{entry['far_fraction'][0]:.2f}, rate_ratio {entry['rate_ratio'][0]:.1f}, volume_ratio "
                     f"{entry['volume_ratio'][0]:.2f}; recommend_full in {entry['recommend_full_votes']}"
                     f"/{entry['seeds']} seeds\n")
    for png in plots:
        lines.append(f"\n![{png}]({png})\n")
    return "\n".join(lines)


__all__ = ["METHODS", "pm", "run_method", "run_retrain", "summarise"]
