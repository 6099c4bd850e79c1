"""mode=refresh's math: per-layer drift, which layers a refresh trains (the others bit-identical),
QK exact after it, the row budget, and auto's choice among qk / refresh / full."""

from __future__ import annotations

import copy

import pytest
import torch

from app.core.data import Split, synthetic_arrays
from app.core.drift import DriftThresholds, gate_layers, structural_drift
from app.core.network import DecoupledModel, PathSelector, ReLUNet
from app.core.refresh import (
    RefreshConfig,
    budget_rows,
    changed_layers,
    choose_layers,
    choose_mode,
    refresh_layers,
    refresh_retrain,
)
from app.core.spec import lenet5, mlp
from app.core.training import TrainConfig, train_full

CFG = TrainConfig(epochs=3, device="cpu", seed=0)


@pytest.fixture(scope="module")
def trained():
    x, y = synthetic_arrays(2400, dim=16, num_classes=4, hidden=32, seed=0)
    data = Split(torch.from_numpy(x), torch.from_numpy(y))
    net = ReLUNet(mlp([16, 32, 32, 32, 4]), seed=0)  # three hidden layers: 0, 2, 4; readout 6
    train_full(net, data.subset(slice(0, 2000)), data.subset(slice(2000, 2400)), CFG, track_stability=False)
    xs, ys = synthetic_arrays(600, dim=16, num_classes=4, hidden=32, seed=5, shift=1.5)
    shifted = Split(torch.from_numpy(xs), torch.from_numpy(ys))
    return net, data, shifted


def test_per_layer_drift_report(trained) -> None:
    net, data, shifted = trained
    same_x, _ = synthetic_arrays(500, dim=16, num_classes=4, hidden=32, seed=9)
    same = structural_drift(PathSelector(net), data.x[:2000], torch.from_numpy(same_x))
    moved = structural_drift(PathSelector(net), data.x[:2000], shifted.x[:500])
    for report in (same, moved):
        assert [(e["layer"], e["param_layer"], e["gates"]) for e in report.layers] == [
            (1, 0, 32), (3, 2, 32), (5, 4, 32)]
        # the per-layer L1s average to the overall one (equal layer sizes here)
        assert sum(e["rate_l1"] for e in report.layers) / 3 == pytest.approx(report.rate_l1, rel=1e-5)
        assert report.to_dict()["layers"] == report.layers
    assert all(r < 2.0 for r in same.layer_rate_ratios), same.layers
    assert moved.layer_rate_ratios[0] > 3.0 and moved.layer_rate_ratios[0] > 2 * max(same.layer_rate_ratios)


def test_gate_layers_walk_back_to_the_weights() -> None:
    spec = lenet5(28, 10)
    owners = gate_layers(PathSelector(ReLUNet(spec, seed=0)))
    for relu, param in owners:
        assert spec.layers[relu]["type"] == "relu" and spec.layers[param]["type"] in ("conv", "linear")
        assert param < relu


def test_choose_layers() -> None:
    layers = [{"layer": 1, "param_layer": 0, "rate_ratio": 9.0},
              {"layer": 3, "param_layer": 2, "rate_ratio": 4.0},
              {"layer": 5, "param_layer": 4, "rate_ratio": 1.1}]
    assert choose_layers(layers, 3.0)[0] == [0, 2]  # every drifted layer
    assert choose_layers(layers, 3.0, max_layers=1)[0] == [0]  # the lowest of them
    calm = [{**e, "rate_ratio": r} for e, r in zip(layers, (1.0, 1.4, 1.2), strict=True)]
    chosen, why = choose_layers(calm, 3.0)
    assert chosen == [2] and "most drifted" in why


def test_refresh_changes_only_the_layers_it_says(trained) -> None:
    net, data, shifted = trained
    before = copy.deepcopy(net)
    work = copy.deepcopy(net)
    train = Split.concat([data.subset(slice(0, 2000)), shifted.subset(slice(0, 400))])
    refresh_layers(work, train, shifted.subset(slice(400, 600)), CFG, [2], RefreshConfig(epochs=1))
    assert changed_layers(before, work) == [2, 6]  # the chosen layer and the readout
    for i in (0, 4):
        for a, b in zip(before.blocks[i].parameters(), work.blocks[i].parameters(), strict=True):
            assert torch.equal(a, b)
    work2 = copy.deepcopy(net)
    refresh_layers(work2, train, shifted.subset(slice(400, 600)), CFG, [0],
                   RefreshConfig(epochs=1, train_readout=False))
    assert changed_layers(before, work2) == [0]
    assert not any(p.requires_grad for p in work2.parameters())
    with pytest.raises(ValueError, match="no weights"):
        refresh_layers(copy.deepcopy(net), train, shifted, CFG, [1])


def test_refresh_retrain_freezes_the_new_structure_and_qk_is_exact(trained) -> None:
    net, data, shifted = trained
    model = DecoupledModel.from_net(net)
    train = Split.concat([data.subset(slice(0, 2000)), shifted.subset(slice(0, 400))])
    is_new = torch.arange(len(train)) >= 2000
    seen: list[dict] = []
    candidate, result = refresh_retrain(model, train, shifted.subset(slice(400, 600)), CFG, [0],
                                        RefreshConfig(epochs=2), seen.append, on_refit=seen.append,
                                        is_new=is_new)
    sel = candidate.selector.net
    assert changed_layers(net, sel) == [0, 6]  # the refreshed layer (+ the readout it trained with)
    assert candidate.shares_hidden_layers()  # estimator hidden layers = the new selector's
    assert not any(p.requires_grad for p in candidate.selector.parameters())
    assert [h.get("stage") for h in seen][-1] == "readout" and result.solver == "refresh"
    assert [h.get("epoch") for h in result.history if h.get("stage") != "readout"] == [1, 2]
    # QK exact: the decoupled model equals the plain net built from its estimator
    x = shifted.x[400:600]
    with torch.no_grad():
        plain = copy.deepcopy(candidate.estimator.net)
        assert torch.allclose(candidate(x), plain(x), atol=1e-5)
    # the champion is untouched
    assert changed_layers(net, model.selector.net) == [] and changed_layers(net, model.estimator.net) == []


def test_budget_rows() -> None:
    is_new = torch.tensor([False] * 10 + [True] * 3)
    rows = budget_rows(is_new, 1.0, seed=0)
    assert rows.numel() == 6 and set(range(10, 13)) <= set(rows.tolist())
    assert torch.equal(rows, budget_rows(is_new, 1.0, seed=0))  # seeded
    assert budget_rows(is_new, None).numel() == 13 and budget_rows(is_new, 5.0).numel() == 13


def _drift(**over) -> dict:
    base = {"rate_ratio": 1.0, "nn_ratio": 1.0, "far_fraction": 0.05, "volume_ratio": 0.2, "judged": True,
            "recommend_full": False, "reason": "new patterns resemble the reference",
            "layers": [{"layer": 1, "param_layer": 0, "rate_ratio": 1.0}]}
    return {**base, **over}


@pytest.mark.parametrize(("drift", "fits", "mode", "says"), [
    (None, True, "qk", "no drift to measure"),
    (_drift(), True, "qk", "resemble"),
    (_drift(rate_ratio=9.5, layers=[{"layer": 1, "param_layer": 0, "rate_ratio": 12.0}]), True, "refresh",
     "layer 0: 12.0"),
    (_drift(far_fraction=0.9), True, "refresh", "far_fraction 0.90 > 0.25"),
    (_drift(rate_ratio=9.5), False, "full", "in-memory budget"),
    (_drift(rate_ratio=9.5, volume_ratio=0.6), True, "full", "volume_ratio 0.60 > 0.3"),
    (_drift(volume_ratio=0.6), True, "full", "much new data"),
    (_drift(rate_ratio=9.5, judged=False), True, "qk", "resemble"),  # too few rows: not judged
])
def test_auto_choice(drift, fits, mode, says) -> None:
    chosen, why = choose_mode(drift, DriftThresholds(), refresh_fits=fits)
    assert chosen == mode and why.startswith(f"auto: {mode}") and says in why, why


def test_auto_chooses_refresh_on_a_constructed_shift(trained) -> None:
    """From a real drift report: the same distribution → qk, a +1.5 offset → refresh."""
    net, data, shifted = trained
    same_x, _ = synthetic_arrays(400, dim=16, num_classes=4, hidden=32, seed=11)
    calm = structural_drift(PathSelector(net), data.x[:2000], torch.from_numpy(same_x)).to_dict()
    moved = structural_drift(PathSelector(net), data.x[:2000], shifted.x[:400]).to_dict()
    assert choose_mode(calm)[0] == "qk"
    mode, why = choose_mode(moved)
    assert mode == "refresh" and "inputs shifted" in why, why
    drifted = [e["param_layer"] for e in moved["layers"] if e["rate_ratio"] > 3.0]
    assert choose_layers(moved["layers"], 3.0)[0] == drifted and drifted[0] == 0
