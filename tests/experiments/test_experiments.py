"""Experiment commands end to end on tiny configurations, and the scenarios they build."""

import json

import torch
from typer.testing import CliRunner

from app.core.data import load_dataset
from app.experiments.cli import experiment_app
from app.experiments.scenario import build_scenario, parse_shift

runner = CliRunner()


def test_retrain_command_writes_json_markdown_png(tmp_path):
    res = runner.invoke(experiment_app, [
        "retrain", "--dataset", "digits", "--seeds", "1", "--new-fraction", "0.2",
        "--shifts", "none,brightness:0.3", "--methods", "none,full_warm,qk_fast,qk_random",
        "--epochs", "2", "--patience", "1", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    payload = json.loads((tmp_path / "retrain_digits_mlp-64-256-256-10.json").read_text())
    assert {e["shift"] for e in payload["summary"]} == {"none", "brightness:0.3"}
    run = payload["runs"][0]
    assert set(run["methods"]) == {"none", "full_warm", "qk_fast", "qk_random"}
    assert 0 < run["methods"]["qk_fast"]["test_acc"] <= 1 and run["methods"]["qk_fast"]["wall_s"] > 0
    assert "recommend_full" in run["drift"]
    md = (tmp_path / "retrain_digits_mlp-64-256-256-10.md").read_text()
    assert "| qk_fast |" in md and "brightness:0.3" in md
    png = tmp_path / "retrain_digits_mlp-64-256-256-10_new0.2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(experiment_app, ["calibrate", str(tmp_path)])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "drift_calibration.md").read_text()
    assert table.count("| digits / mlp:64-256-256-10 |") == 2
    assert (tmp_path / "drift_calibration.png").exists()


def test_stability_command_writes_json_markdown_png(tmp_path):
    res = runner.invoke(experiment_app, [
        "stability", "--dataset", "digits", "--arch", "mlp:32", "--seeds", "2", "--epochs", "3",
        "--probe-size", "64", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "stability_digits_mlp-64-32-10.json").read_text())
    assert len(data["runs"]) == 2 and data["summary"]["epochs"] == 3
    flips = data["curves"]["gate_flip"]["mean"]
    assert len(flips) == 3 and all(0 <= f <= 1 for f in flips)
    assert data["curves"]["gate_diff_to_final"]["mean"][-1] == 0.0
    assert (tmp_path / "stability_digits_mlp-64-32-10.png").stat().st_size > 1000
    assert "gates flipped" in (tmp_path / "stability_digits.md").read_text()


def test_scenarios_split_and_shift():
    data = load_dataset("digits", seed=0)
    s = build_scenario(data, 0.25, "none", 0)
    assert len(s.old) + len(s.new) == len(data.train)
    assert len(s.val) == len(data.val) and torch.equal(s.test.x, data.test.x)
    b = build_scenario(data, 0.25, "brightness:0.3", 0)
    assert torch.equal(b.old.x, s.old.x)  # the old data never shifts
    assert float(b.new.x.min()) >= 0.3 - 1e-6 and float(b.new.x.max()) <= 1.0
    assert torch.equal(b.new.y, s.new.y)
    c = build_scenario(data, 0.25, "classfreq:0.0", 0)
    assert int(c.new.y.max()) < data.num_classes // 2 and int(c.test.y.max()) < data.num_classes // 2
    syn = load_dataset("synthetic", seed=0, synthetic_n=600)
    shifted = build_scenario(syn, 0.5, "brightness:1.0", 0)
    assert abs(float(shifted.new.x.mean()) - 1.0) < 0.1  # N(1, 1) inputs, teacher labels
    assert parse_shift("contrast:0.5") == ("contrast", 0.5)


def test_retrain_with_refresh_writes_combined_accuracy_auto_and_mode_calibration(tmp_path):
    res = runner.invoke(experiment_app, [
        "retrain", "--dataset", "digits", "--arch", "mlp:32", "--seeds", "1", "--new-fraction", "0.2",
        "--shifts", "none,noise:0.3", "--methods", "none,full_warm,qk_fast,refresh",
        "--epochs", "2", "--patience", "1", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    payload = json.loads((tmp_path / "retrain_digits_mlp-64-32-10.json").read_text())
    for run in payload["runs"]:
        refresh = run["methods"]["refresh"]
        assert 0 < refresh["test_acc"] <= 1 and 0 < refresh["test_combined_acc"] <= 1
        assert refresh["wall_s"] > 0
        assert refresh["layers"] and refresh["curve"][-1][1] == refresh["test_acc"]
        assert run["auto"] in ("qk", "refresh", "full")
        assert len(run["drift"]["layers"]) == 1 and run["drift"]["layers"][0]["param_layer"] == 0
    assert "refresh − full warm (paired)" in (tmp_path / "retrain_digits_mlp-64-32-10.md").read_text()
    res = runner.invoke(experiment_app, ["calibrate", str(tmp_path)])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "mode_calibration.md").read_text()
    assert table.count("| digits / mlp:64-32-10 |") == 2 and (tmp_path / "mode_calibration.png").exists()


def test_offset_and_noise_shifts():
    syn = load_dataset("synthetic", seed=0, synthetic_n=800)
    shifted = build_scenario(syn, 0.5, "offset:2.0", 0)
    quarter = syn.train.x.shape[1] // 4
    assert abs(float(shifted.new.x[:, :quarter].mean()) - 2.0) < 0.15  # the first quarter moved
    assert abs(float(shifted.new.x[:, quarter:].mean())) < 0.1  # the rest did not
    digits = load_dataset("digits", seed=0)
    noisy = build_scenario(digits, 0.25, "noise:0.2", 0)
    assert float(noisy.new.x.min()) >= 0.0 and float(noisy.new.x.max()) <= 1.0
    assert not torch.equal(noisy.new.x, build_scenario(digits, 0.25, "none", 0).new.x)
    assert parse_shift("offset:1.5") == ("offset", 1.5) and parse_shift("noise:0.2") == ("noise", 0.2)
