"""Hypothesis 1: structural knowledge stabilises early in training.

For each seed, a full training run without early stopping records, per epoch, on a fixed
probe set (the first ``probe_size`` validation samples): the fraction of ReLU gates flipped
since the previous epoch (and of max-pool choices), the fraction still differing from the
final epoch's pattern, the relative change of the weights, and train/validation loss.
Output: ``stability_<dataset>_<arch>.{json,md,png}`` with mean ± std over seeds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from app.core.data import load_dataset
from app.core.network import PathSelector, ReLUNet
from app.core.spec import resolve_arch
from app.core.structure import gate_flip_fraction
from app.core.training import TrainConfig, train_full
from app.experiments.report import FIG_DPI, markdown_table, mean_std, pyplot, save_figure, slug, write_json

CURVES = ("gate_flip", "pool_flip", "gate_diff_to_final", "weight_rel_change", "train_loss",
          "val_loss", "val_acc")


def run_seed(dataset: str, arch: str, seed: int, epochs: int, batch_size: int, lr: float,
             probe_size: int, device: str | None, synthetic_n: int) -> dict[str, Any]:
    data = load_dataset(dataset, seed=seed, synthetic_n=synthetic_n)
    spec = resolve_arch(arch, data.input_dim, data.num_classes)
    net = ReLUNet(spec, seed=seed)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=epochs + 1, seed=seed,
                      device=device, probe_size=probe_size)
    probe = data.val.x[:probe_size]
    patterns = []

    def on_epoch(_metrics: dict[str, Any]) -> None:
        patterns.append(PathSelector(net).packed_structure(probe.to(next(net.parameters()).device)))

    started = time.perf_counter()
    result = train_full(net, data.train, data.val, cfg, on_epoch=on_epoch, track_stability=True)
    history = result.history
    final = patterns[-1]
    for h, p in zip(history, patterns, strict=True):
        h["gate_diff_to_final"] = gate_flip_fraction(p, final)
    return {"seed": seed, "arch": spec.name, "history": history, "wall_s": time.perf_counter() - started,
            "num_gates": final.num_units, "has_pools": bool(final.pool_choices)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    epochs = min(len(r["history"]) for r in runs)
    curves: dict[str, dict[str, list[float]]] = {}
    for key in CURVES:
        values = np.array([[r["history"][e][key] for e in range(epochs)] for r in runs], dtype=float)
        curves[key] = {"mean": values.mean(0).tolist(),
                       "std": (values.std(0, ddof=1) if len(runs) > 1 else values.std(0) * 0).tolist(),
                       "median": np.median(values, 0).tolist()}
    gate = np.array(curves["gate_flip"]["mean"])
    val = np.array(curves["val_loss"]["mean"])
    train = np.array(curves["train_loss"]["mean"])
    val_acc = np.array(curves["val_acc"]["mean"])
    summary: dict[str, Any] = {"epochs": epochs, "best_val_epoch": int(val.argmin()) + 1}
    drop = train[0] - train.min()
    for pct in (5, 1):
        # first epoch from which every later epoch flips < pct % of the gates (mean over seeds)
        settled = next((e + 1 for e in range(epochs) if (gate[e:] < pct / 100).all()), None)
        summary[f"settled_epoch_{pct}pct"] = settled
        if settled is not None:
            summary[f"train_loss_left_at_{pct}pct"] = (
                float((train[settled - 1] - train.min()) / drop) if drop > 0 else 0.0)
            summary[f"val_acc_at_{pct}pct"] = float(val_acc[settled - 1])
    return {"curves": curves, "summary": summary}


def plot(summary: dict[str, Any], title: str, path: Path) -> None:
    plt = pyplot()
    curves = summary["curves"]
    epochs = np.arange(1, len(curves["gate_flip"]["mean"]) + 1)
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=FIG_DPI)
    ax2 = ax.twinx()

    def band(axis, key: str, color: str, label: str, style: str = "-", scale: float = 1.0) -> None:
        m = np.array(curves[key]["mean"]) * scale
        s = np.array(curves[key]["std"]) * scale
        axis.plot(epochs, m, style, color=color, label=label, lw=1.6)
        axis.fill_between(epochs, np.maximum(m - s, 0), m + s, color=color, alpha=0.18, lw=0)

    band(ax, "gate_flip", "tab:red", "gates flipped since previous epoch (%)", scale=100)
    ax.plot(epochs, np.array(curves["gate_flip"]["median"]) * 100, "-", color="darkred", lw=0.8,
            label="… median over seeds")
    if max(curves["pool_flip"]["mean"]) > 0:
        band(ax, "pool_flip", "tab:brown", "max-pool choices flipped (%)", "-.", 100)
    band(ax, "gate_diff_to_final", "tab:orange", "gates differing from final epoch (%)", "--", 100)
    band(ax, "weight_rel_change", "tab:purple", "relative weight change (%)", ":", 100)
    band(ax2, "train_loss", "tab:blue", "train loss")
    band(ax2, "val_loss", "tab:green", "validation loss")
    ax.set_yscale("symlog", linthresh=1.0)  # linear below 1 %, logarithmic above
    ax.set_xlabel("epoch")
    ax.set_ylabel("% (symlog)")
    ax.set_ylim(bottom=0)
    ax2.set_ylabel("cross-entropy")
    ax2.set_ylim(bottom=0)
    ax.set_title(title)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    fig.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="lower center", ncol=2,
               frameon=False)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    save_figure(fig, path)
    plt.close(fig)


def markdown(dataset: str, arch: str, runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    curves = summary["curves"]
    n = summary["summary"]["epochs"]
    shown = sorted({1, 2, 3, 5, 10, 15, 20, 30, 40, 50, n} & set(range(1, n + 1)))

    def cell(key: str, e: int, scale: float = 1.0, digits: int = 3) -> str:
        m, s = curves[key]["mean"][e - 1] * scale, curves[key]["std"][e - 1] * scale
        return f"{m:.{digits}f} ± {s:.{digits}f}"

    has_pools = runs[0].get("has_pools", True)
    rows = [[e, cell("gate_flip", e, 100, 2), f"{100 * curves['gate_flip']['median'][e - 1]:.2f}",
             cell("pool_flip", e, 100, 2) if has_pools else "–", cell("gate_diff_to_final", e, 100, 2),
             cell("weight_rel_change", e, 100, 2), cell("train_loss", e), cell("val_loss", e),
             cell("val_acc", e, 100, 1)] for e in shown]
    s = summary["summary"]
    walls = mean_std([r["wall_s"] for r in runs])
    head = (f"### {dataset} / {runs[0]['arch']} ({len(runs)} seeds, {n} epochs, "
            f"{runs[0]['num_gates']} gates per sample, {walls[0]:.1f} s per run)\n\n")
    table = markdown_table(["epoch", "gates flipped %", "median", "pool choices flipped %",
                            "differ from final %", "weight change %", "train loss", "val loss", "val acc %"],
                           rows)
    parts = []
    for pct in (5, 1):
        settled = s.get(f"settled_epoch_{pct}pct")
        if settled:
            parts.append(f"gates flip < {pct} % per epoch from epoch {settled} on (train loss still "
                         f"{100 * s[f'train_loss_left_at_{pct}pct']:.1f} % above its final value "
                         f"relative to its total decrease; validation accuracy then "
                         f"{100 * s[f'val_acc_at_{pct}pct']:.1f} %)")
        else:
            parts.append(f"gates never settle below {pct} % per epoch within {n} epochs")
    tail = ("\n\nMean over seeds: " + "; ".join(parts)
            + f"; best validation loss at epoch {s['best_val_epoch']}.\n")
    return head + table + tail


def run_stability(dataset: str, archs: list[str], seeds: int, epochs: int, out: Path,
                  batch_size: int = 128, lr: float = 1e-3, probe_size: int = 512,
                  device: str | None = None, synthetic_n: int = 20_000,
                  log=print) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"dataset": dataset, "seeds": seeds, "epochs": epochs, "archs": {}}
    sections = [f"# Hypothesis 1 — SK stability on {dataset}\n"]
    for arch in archs:
        runs = []
        for seed in range(seeds):
            runs.append(run_seed(dataset, arch, seed, epochs, batch_size, lr, probe_size, device,
                                 synthetic_n))
            log(f"stability {dataset} {arch} seed {seed}: {runs[-1]['wall_s']:.1f}s")
        summary = summarise(runs)
        name = slug(f"stability_{dataset}_{runs[0]['arch']}")
        plot(summary, f"SK stability: {dataset} / {runs[0]['arch']} ({seeds} seeds, mean ± std)",
             out / f"{name}.png")
        md = markdown(dataset, arch, runs, summary)
        sections.append(md + f"\n![{name}]({name}.png)\n")
        results["archs"][runs[0]["arch"]] = {"runs": runs, **summary}
        write_json(out / f"{name}.json", {"dataset": dataset, "arch": runs[0]["arch"], "runs": runs,
                                          **summary})
    (out / f"stability_{slug(dataset)}.md").write_text("\n".join(sections))
    return results
