"""The experiment plots say what their lines are: the drift plot's dashed threshold is in the
legend, and a "no retrain" baseline far below the methods (brightness shift) does not squash
them: it is named with its value instead of stretching the axis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from app.core.drift import DriftThresholds
from app.experiments import calibrate, retrain


def _capture(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[Any]:
    figs: list[Any] = []
    monkeypatch.setattr(module, "save_figure", lambda fig, path: figs.append(fig))
    return figs


def _run(shift: str, seed: int, accs: dict[str, float]) -> dict[str, Any]:
    return {"shift": shift, "new_fraction": 0.5, "seed": seed,
            "methods": {m: {"wall_s": 0.0 if m == "none" else 1.0 + seed, "test_acc": a + 0.002 * seed,
                            "curve": []} for m, a in accs.items()}}


def test_far_baseline_does_not_squash_the_methods(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    figs = _capture(monkeypatch, retrain)
    runs = [_run("none", s, {"none": 0.942, "full_warm": 0.962, "qk_fast": 0.947}) for s in range(3)]
    runs += [_run("brightness:0.3", s, {"none": 0.62, "full_warm": 0.96, "qk_fast": 0.945}) for s in range(3)]
    retrain.plot_time_to_accuracy(runs, ["none", "full_warm", "qk_fast"], ["none", "brightness:0.3"], "t",
                                  tmp_path / "p.png")
    near, far = figs[0].axes
    assert near.get_ylim()[0] < 94.2 < near.get_ylim()[1]  # a close baseline is drawn on the axis
    assert any(t.get_text().startswith("none (no retrain): 94.") for t in near.get_legend().get_texts())
    lo, hi = far.get_ylim()
    assert lo > 90 and hi - lo < 5, (lo, hi)  # before: 40–100, the methods a sliver at the top
    labels = [t.get_text() for t in far.get_legend().get_texts()]
    assert "none (no retrain): 62.2 %, below this axis" in labels, labels


def test_drift_plot_labels_its_dashed_threshold(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    figs = _capture(monkeypatch, calibrate)
    groups = [{"shift": "brightness:0.3", "rate_ratio": (3.0, 0.1), "gap": (-0.01, 0.002),
               "volume_ratio": (0.5, 0.0)}]
    calibrate.plot(groups, tmp_path / "d.png", DriftThresholds())
    labels = [t.get_text() for t in figs[0].axes[0].get_legend().get_texts()]
    assert f"rule: full when rate_ratio > {DriftThresholds().rate_ratio}" in labels, labels
