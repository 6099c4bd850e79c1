"""Structural drift: ~0 for the same distribution, clearly larger for a shifted one."""

import pytest
import torch

from app.core.data import Split, synthetic_arrays
from app.core.drift import DriftThresholds, nearest_hamming, structural_drift
from app.core.network import PathSelector, ReLUNet
from app.core.spec import lenet5, mlp
from app.core.training import TrainConfig, train_full


@pytest.fixture(scope="module")
def selector_and_data():
    x, y = synthetic_arrays(3000, dim=16, num_classes=4, hidden=32, seed=0)
    data = Split(torch.from_numpy(x), torch.from_numpy(y))
    net = ReLUNet(mlp([16, 64, 64, 4]), seed=0)
    train_full(net, data.subset(slice(0, 2000)), data.subset(slice(2000, 2400)),
               TrainConfig(epochs=3, device="cpu"), track_stability=False)
    return PathSelector(net), data


def test_same_distribution_has_no_drift(selector_and_data):
    selector, data = selector_and_data
    x_new, _ = synthetic_arrays(400, dim=16, num_classes=4, hidden=32, seed=7)
    r = structural_drift(selector, data.x[:2400], torch.from_numpy(x_new))
    assert 0.85 < r.nn_ratio < 1.15
    assert r.far_fraction < 0.15
    assert r.rate_ratio < 2.0
    assert not r.recommend_full, r.reason


def test_shifted_inputs_drift_and_recommend_full(selector_and_data):
    selector, data = selector_and_data
    x_new, _ = synthetic_arrays(400, dim=16, num_classes=4, hidden=32, seed=7, shift=1.5)
    same = structural_drift(selector, data.x[:2400], data.x[2400:2800])
    r = structural_drift(selector, data.x[:2400], torch.from_numpy(x_new))
    assert r.nn_ratio > same.nn_ratio + 0.05  # nearest patterns move a little (128 gates)...
    assert r.rate_ratio > 3 * same.rate_ratio  # ...firing rates a lot
    assert r.far_fraction > same.far_fraction
    assert r.recommend_full and "rate_ratio" in r.reason


def test_volume_alone_can_recommend_full(selector_and_data):
    selector, data = selector_and_data
    r = structural_drift(selector, data.x[:1000], data.x[1000:2000])
    assert r.volume_ratio == pytest.approx(1.0)
    assert r.recommend_full and "volume_ratio" in r.reason
    lenient = structural_drift(selector, data.x[:1000], data.x[1000:2000],
                               thresholds=DriftThresholds(volume_ratio=2.0))
    assert not lenient.recommend_full


def test_report_is_deterministic_and_serialisable(selector_and_data):
    selector, data = selector_and_data
    a = structural_drift(selector, data.x[:2000], data.x[2000:2300], seed=3).to_dict()
    b = structural_drift(selector, data.x[:2000], data.x[2000:2300], seed=3).to_dict()
    assert a == b
    assert {"nn_hamming", "nn_hamming_baseline", "nn_ratio", "far_fraction", "rate_l1", "rate_l1_baseline",
            "rate_ratio", "volume_ratio", "n_reference", "n_new", "recommend_full", "reason"} <= set(a)
    assert isinstance(a["recommend_full"], bool)


def test_nearest_hamming_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q = torch.rand(17, 40, generator=g) > 0.5
    bank = torch.rand(23, 40, generator=g) > 0.5
    expected = torch.stack([(qi != bank).float().mean(1).min() for qi in q])
    assert torch.allclose(nearest_hamming(q, bank, chunk=5), expected)


def test_drift_on_cnn_runs():
    selector = PathSelector(ReLUNet(lenet5(8, 3), seed=0))
    x = torch.rand(300, 64)
    r = structural_drift(selector, x[:200], (x[200:] + 0.5).clamp(0, 1), bank_size=64, query_size=32)
    assert r.n_reference == 64 and r.n_new == 32


# ---- trickles: the signals account for how many new samples there are -----------------------

@pytest.fixture(scope="module")
def digits_selector():
    """An MLP trained on 1,500 digits rows; the other 297 are same-distribution new rows."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.data / 16.0).astype("float32"))
    y = torch.from_numpy(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    ref, pool = perm[:1500], perm[1500:]
    net = ReLUNet(mlp([64, 64, 64, 10]), seed=0)
    train_full(net, Split(x[ref[:1300]], y[ref[:1300]]), Split(x[ref[1300:]], y[ref[1300:]]),
               TrainConfig(epochs=6, device="cpu"), track_stability=False)
    return PathSelector(net), x[ref], x[pool]


@pytest.mark.parametrize("n", [1, 10])
def test_a_trickle_is_not_enough_to_judge(digits_selector, n):
    selector, reference, pool = digits_selector
    for seed in range(10):  # whatever rows the trickle holds
        rows = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]]
        r = structural_drift(selector, reference, rows, seed=seed)
        assert not r.judged and not r.recommend_full, r
        assert "not enough new data to judge" in r.reason and f"{n} new samples" in r.reason
        assert r.n_new_samples == n


def test_a_hundred_same_distribution_rows_are_judged_and_stay_qk(digits_selector):
    selector, reference, pool = digits_selector
    for seed in range(10):
        rows = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:100]]
        r = structural_drift(selector, reference, rows, seed=seed)
        assert r.judged and not r.recommend_full, r
        # the noise floor is taken at 100 rows, not at the 512 held-out ones: ≈ 1, not ≈ 2
        assert r.rate_ratio < 1.6 and r.nn_ratio < 1.2 and r.far_fraction < 0.15, r


def test_a_hundred_rows_unlike_digits_recommend_full(digits_selector):
    selector, reference, _pool = digits_selector
    r = structural_drift(selector, reference, torch.rand(100, 64, generator=torch.Generator().manual_seed(0)))
    assert r.judged and r.recommend_full, r
    assert "nn_ratio" in r.reason and "rate_ratio" in r.reason, r


def test_volume_is_exact_and_applies_to_few_rows(digits_selector):
    selector, reference, pool = digits_selector
    r = structural_drift(selector, reference[:100], pool[:40])  # 40 rows: too few to judge...
    assert not r.judged
    assert r.recommend_full and "volume_ratio 0.40" in r.reason  # ...but 40 % more data is a fact


def test_decide_without_a_sample_size_judges_everything():
    # calibrate.py re-decides stored runs that carry no sample size: as before
    t = DriftThresholds()
    signals = {"rate_ratio": 5.0, "nn_ratio": 1.0, "far_fraction": 0.0, "volume_ratio": 0.1}
    assert t.decide(signals)[0]
    assert not t.decide(signals, n_new=10)[0]
    assert t.decide(signals, n_new=t.min_new_samples)[0]
