"""Structural drift: how far new samples' gate patterns are from the training data's.

A QK-only retrain keeps the selector's structure. It is the right retrain while new samples
fall on activation patterns like those the structure was learned on, and the wrong one when
they do not (a shifted input distribution) or when the new data is as large as the old (the
structure itself would improve). This module measures the first on a sub-sample, cheaply and
on the selector's device, and folds in the second, to recommend ``mode=full`` or ``qk``.

Signals (all from the selector's binary ReLU patterns; max-pool choices are not used):

* ``nn_hamming`` — mean, over sampled new samples, of the normalised Hamming distance to the
  nearest pattern in a sampled reference bank; ``nn_hamming_baseline`` is the same for held-out
  reference samples against the same bank, and ``nn_ratio`` their quotient (≈ 1 for the same
  distribution, whatever the architecture).
* ``far_fraction`` — share of new samples farther from the bank than the 95th percentile of
  the held-out reference samples (≈ 0.05 for the same distribution).
* ``rate_l1`` — mean absolute difference of per-unit firing rates, new vs reference bank;
  ``rate_l1_baseline`` the same for the held-out reference sample (the sampling noise floor,
  same sample sizes), and ``rate_ratio`` their quotient (≈ 1 for the same distribution). The
  most sensitive of the three to input shifts such as a brightness change.
* ``volume_ratio`` — number of new samples over number of reference samples.

``recommend_full`` applies :class:`DriftThresholds` (calibrated in docs/EXPERIMENTS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from app.core.network import PathSelector


@dataclass(frozen=True)
class DriftThresholds:
    """When to recommend a full retrain (any one suffices). Calibrated in docs/EXPERIMENTS.md.

    ``volume_ratio`` compares the new data with the data the *selector* was trained on: pass
    everything added since the last full retrain as ``new_x``, not just the last batch.
    """

    rate_ratio: float = 3.0
    nn_ratio: float = 1.25
    far_fraction: float = 0.25
    volume_ratio: float = 0.3

    def decide(self, signals: dict[str, float]) -> tuple[bool, str]:
        """(recommend_full, reason) for a dict holding the four signals named like the fields."""
        reasons = [f"{name} {signals[name]:.2f} > {limit}"
                   for name, limit in (("rate_ratio", self.rate_ratio), ("nn_ratio", self.nn_ratio),
                                       ("far_fraction", self.far_fraction),
                                       ("volume_ratio", self.volume_ratio))
                   if signals[name] > limit]
        if reasons:
            return True, "; ".join(reasons)
        return False, "new patterns resemble the reference and the new data is small: qk"


@dataclass
class DriftReport:
    nn_hamming: float
    nn_hamming_baseline: float
    nn_ratio: float
    far_fraction: float
    rate_l1: float
    rate_l1_baseline: float
    rate_ratio: float
    volume_ratio: float
    n_reference: int  # sampled reference patterns in the bank
    n_new: int  # sampled new patterns
    recommend_full: bool
    reason: str

    def to_dict(self) -> dict[str, float | int | bool | str]:
        return asdict(self)


@torch.no_grad()
def gate_patterns(selector: PathSelector, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """bool[N, G]: every ReLU gate of every sample, all layers concatenated."""
    parts = []
    for i in range(0, x.shape[0], chunk):
        s = selector.structure(x[i:i + chunk])
        parts.append(torch.cat([g.reshape(g.shape[0], -1) for g in s.gates], dim=1))
    return torch.cat(parts)


def nearest_hamming(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Normalised Hamming distance of each query pattern to its nearest bank pattern.

    Patterns are bool[·, G]; computed as a matrix product of ±1 codes, chunked over queries.
    """
    g = queries.shape[1]
    if g == 0 or bank.shape[0] == 0:
        return torch.zeros(queries.shape[0], device=queries.device)
    b = bank.to(torch.float32) * 2 - 1
    out = []
    for i in range(0, queries.shape[0], chunk):
        q = queries[i:i + chunk].to(torch.float32) * 2 - 1
        agree = (q @ b.T).max(dim=1).values  # = G − 2·min Hamming
        out.append((g - agree) / (2 * g))
    return torch.cat(out)


def _sample(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)[:min(k, n)]


@torch.no_grad()
def structural_drift(selector: PathSelector, reference_x: torch.Tensor, new_x: torch.Tensor, *,
                     bank_size: int = 1024, query_size: int = 512, max_gates: int = 2048,
                     seed: int = 0, thresholds: DriftThresholds | None = None) -> DriftReport:
    """Structural drift of ``new_x`` relative to ``reference_x`` under ``selector``.

    ``reference_x``: samples the structure was learned on (e.g. the previous training set);
    ``new_x``: samples added since. Both are flat float feature tensors on any device; at most
    ``bank_size + query_size`` reference rows and ``query_size`` new rows are used, moved to
    the selector's device, and nearest-pattern distances use at most ``max_gates`` randomly
    chosen gates (firing rates use all). Cost: selector passes over those rows and two
    ``query_size × bank_size × max_gates`` matrix products; deterministic for a given seed.
    """
    thresholds = thresholds or DriftThresholds()
    if reference_x.shape[0] < 2 or new_x.shape[0] < 1:
        raise ValueError("need at least 2 reference samples and 1 new sample")
    device = next(selector.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ref_rows = _sample(reference_x.shape[0], bank_size + query_size, generator)
    n_held = min(query_size, ref_rows.numel() // 2)  # small reference sets: split in halves
    n_bank = min(bank_size, ref_rows.numel() - n_held)
    bank_rows, held_rows = ref_rows[:n_bank], ref_rows[n_bank:n_bank + n_held]
    new_rows = _sample(new_x.shape[0], query_size, generator)

    bank = gate_patterns(selector, reference_x[bank_rows.to(reference_x.device)].to(device))
    held = gate_patterns(selector, reference_x[held_rows.to(reference_x.device)].to(device))
    new = gate_patterns(selector, new_x[new_rows.to(new_x.device)].to(device))

    cols = _sample(bank.shape[1], max_gates, generator).to(device)
    held_nn = nearest_hamming(held[:, cols], bank[:, cols])
    new_nn = nearest_hamming(new[:, cols], bank[:, cols])
    baseline = float(held_nn.mean())
    nn_new = float(new_nn.mean())
    nn_ratio = nn_new / max(baseline, 1e-6)
    cutoff = torch.quantile(held_nn.float(), 0.95)
    far = float((new_nn > cutoff).float().mean())
    rate_bank, rate_held, rate_new = (p.float().mean(0) for p in (bank, held, new))
    rate_l1 = float((rate_new - rate_bank).abs().mean()) if bank.shape[1] else 0.0
    rate_base = float((rate_held - rate_bank).abs().mean()) if bank.shape[1] else 0.0
    rate_ratio = rate_l1 / max(rate_base, 1e-6)
    volume = new_x.shape[0] / reference_x.shape[0]

    recommend, reason = thresholds.decide({"rate_ratio": rate_ratio, "nn_ratio": nn_ratio,
                                           "far_fraction": far, "volume_ratio": volume})
    return DriftReport(nn_hamming=nn_new, nn_hamming_baseline=baseline, nn_ratio=nn_ratio,
                       far_fraction=far, rate_l1=rate_l1, rate_l1_baseline=rate_base,
                       rate_ratio=rate_ratio, volume_ratio=volume, n_reference=int(bank.shape[0]),
                       n_new=int(new.shape[0]),
                       recommend_full=recommend, reason=reason)
