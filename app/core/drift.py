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
  ``rate_l1_baseline`` the same for the held-out reference sample, rescaled to the number of
  new samples (the sampling noise floor at *their* sample size, see below), and
  ``rate_ratio`` their quotient (≈ 1 for the same distribution, whatever the number of new
  samples). The most sensitive of the three to input shifts such as a brightness change.
* ``volume_ratio`` — number of new samples over number of reference samples.

``recommend_full`` applies :class:`DriftThresholds` (calibrated in docs/EXPERIMENTS.md).

**Few new samples.** The three distribution signals are averages over the new samples, so
their noise grows as the number of new samples n shrinks, and thresholds calibrated on
hundreds of rows fire on a trickle by chance alone (one ordinary digits row gave
``rate_ratio`` 22: a single row's firing "rates" are 0 or 1, and the held-out baseline was
measured on 512 rows). Two things account for n:

1. the firing-rate baseline is rescaled to n: per unit, ``p̂_new − p̂_bank`` has variance
   ``p(1−p)·(1/n + 1/n_bank)`` under the same distribution, the held-out difference
   ``p(1−p)·(1/n_held + 1/n_bank)``, so the held-out mean absolute difference is multiplied
   by ``sqrt((1/n + 1/n_bank) / (1/n_held + 1/n_bank))`` (the normal approximation:
   mean |difference| is proportional to its standard deviation). Without it, the
   same-distribution ``rate_ratio`` averaged 11.7 at n = 1, 6.3 at n = 10 and 2.0 at
   n = 100 in the measurement below; with it, 0.7–1.1 at every n. The price is honest: a
   small sample needs a stronger shift to stand out of its larger noise (brightness +0.3
   on that 64-64 MLP: 2.95 at 100 rows, 4.5 at 297);
2. below ``DriftThresholds.min_new_samples`` (default 100) new samples the distribution
   signals are not judged at all: the report says "not enough new data to judge" and does
   not recommend ``full`` on them (``judged`` is False). Measured on digits (MLPs 64-64 and
   256-256 trained on 1,500 rows; same-distribution trickles drawn from the 297 others, 50
   draws per size and net), with the rescaled baseline: at n = 1 ``nn_ratio`` reached 2.6
   and ``far_fraction`` 1.0 (one far row is 100 %); at n = 10 ``far_fraction`` reached 0.3
   (≥ 3 of 10 rows beyond a 5 % quantile: a binomial tail of about 1 %); at n = 50
   ``nn_ratio`` still reached 1.28 (threshold 1.25). From n = 100 on no draw came near a
   threshold (maxima: ``rate_ratio`` 1.41, ``nn_ratio`` 1.21, ``far_fraction`` 0.10), while
   shifted inputs still trip them (tests/core/test_drift.py). 100 rows is small next to what
   a retrain needs anyway, and new samples are counted since the selector was trained, so
   they accumulate across QK retrains: a trickle is judged once 100 rows have arrived.

``volume_ratio`` is an exact count, not an estimate, so it is applied whatever n is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from app.core.network import PathSelector
from app.core.spec import ACTIVATION_TYPES, layer_inputs


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
    min_new_samples: int = 100  # fewer: the distribution signals are not judged (module doc)

    def judged(self, n_new: int) -> bool:
        """Are ``n_new`` new samples enough to judge the distribution signals?"""
        return n_new >= self.min_new_samples

    def decide(self, signals: dict[str, float], n_new: int | None = None) -> tuple[bool, str]:
        """(recommend_full, reason) for a dict holding the four signals named like the fields.

        ``n_new``: how many new samples the signals were measured on; below
        ``min_new_samples`` only ``volume_ratio`` (an exact count) can recommend ``full``.
        """
        judged = n_new is None or self.judged(n_new)
        limits = [("volume_ratio", self.volume_ratio)]
        if judged:
            limits = [("rate_ratio", self.rate_ratio), ("nn_ratio", self.nn_ratio),
                      ("far_fraction", self.far_fraction), *limits]
        reasons = [f"{name} {signals[name]:.2f} > {limit}" for name, limit in limits
                   if signals[name] > limit]
        if reasons:
            return True, "; ".join(reasons)
        if not judged:
            return False, (f"not enough new data to judge drift: {n_new} new samples < "
                           f"{self.min_new_samples} (min_new_samples); volume_ratio "
                           f"{signals['volume_ratio']:.2f} <= {self.volume_ratio}: qk")
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
    n_new_samples: int = 0  # all new samples (n_new is at most query_size of them)
    judged: bool = True  # False: too few new samples to judge the distribution signals
    # per gated layer (ReLU layers in spec order): its spec index, the parameter layer whose
    # pre-activation it gates, its firing-rate L1 and ratio (same definition as rate_ratio)
    layers: list[dict[str, float | int]] = field(default_factory=list)

    @property
    def layer_rate_ratios(self) -> list[float]:
        return [float(entry["rate_ratio"]) for entry in self.layers]

    def to_dict(self) -> dict[str, float | int | bool | str]:
        return asdict(self)


@torch.no_grad()
def gate_patterns(selector: PathSelector, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """bool[N, G]: every ReLU gate of every sample, all layers concatenated.

    A 3-piece unit (ReLU6, Hardtanh) gives its two thermometer bits 1[piece ≥ 1], 1[piece ≥ 2]
    (as in the packed structure), so Hamming distances count piece changes: one per breakpoint
    crossed. Nets with only 2-piece activations give exactly their gates.
    """
    parts = []
    for i in range(0, x.shape[0], chunk):
        s = selector.structure(x[i:i + chunk])
        cols = []
        for g in s.gates:
            g = g.reshape(g.shape[0], -1)
            cols += [g] if g.dtype == torch.bool else [g >= 1, g >= 2]
        parts.append(torch.cat(cols, dim=1))
    return torch.cat(parts)


def gate_layers(selector: PathSelector) -> list[tuple[int, int]]:
    """(ReLU layer spec index, the parameter layer feeding it) for every gated layer, in order.

    The parameter layer is found by walking back through layers without weights (pools,
    flatten): its weights set the gate's pre-activation, so a refresh of that gate trains it.
    """
    spec = selector.spec
    out = []
    for i, layer in enumerate(spec.layers):
        if layer["type"] not in ACTIVATION_TYPES:  # every piecewise-linear activation is gated
            continue
        j = i
        while j >= 0 and spec.layers[j]["type"] not in ("linear", "conv"):
            ins = layer_inputs(j, spec.layers[j])
            j = ins[0] if len(ins) == 1 else -1  # an add joins two paths: no single owner
        out.append((i, j))
    return out


@torch.no_grad()
def gate_layer_sizes(selector: PathSelector, x_one: torch.Tensor) -> list[int]:
    """Number of gate columns per gated layer in :func:`gate_patterns` (one sample's structure):
    one per unit, two per unit of a 3-piece layer (its thermometer bits)."""
    return [int(g[0].numel()) * (1 if g.dtype == torch.bool else 2)
            for g in selector.structure(x_one[:1]).gates]


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


def noise_scale(n_new: int, n_held: int, n_bank: int) -> float:
    """Factor from the held-out firing-rate noise floor to the one at ``n_new`` samples.

    Same distribution: a unit's rate estimate from n rows differs from the bank's by a
    difference of variance ``p(1−p)·(1/n + 1/n_bank)``; the held-out baseline was measured
    with n = ``n_held``. The mean absolute difference scales with the standard deviation.
    """
    if min(n_new, n_held, n_bank) <= 0:
        return 1.0
    return math.sqrt((1 / n_new + 1 / n_bank) / (1 / n_held + 1 / n_bank))


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
    return structural_drift_rows(selector, int(reference_x.shape[0]), int(new_x.shape[0]),
                                 lambda rows: reference_x[rows.to(reference_x.device)],
                                 lambda rows: new_x[rows.to(new_x.device)], bank_size=bank_size,
                                 query_size=query_size, max_gates=max_gates, seed=seed,
                                 thresholds=thresholds)


RowTaker = Callable[[torch.Tensor], torch.Tensor]  # row positions → those rows' features


@torch.no_grad()
def structural_drift_rows(selector: PathSelector, n_reference: int, n_new: int, take_reference: RowTaker,
                          take_new: RowTaker, *, bank_size: int = 1024, query_size: int = 512,
                          max_gates: int = 2048, seed: int = 0,
                          thresholds: DriftThresholds | None = None) -> DriftReport:
    """:func:`structural_drift` over data too large to hold: ``n_reference`` / ``n_new`` rows of
    which only the sampled ones are fetched, by position, through ``take_reference`` /
    ``take_new`` (the same positions, hence the same report, as with the whole tensors)."""
    thresholds = thresholds or DriftThresholds()
    if n_reference < 2 or n_new < 1:
        raise ValueError("need at least 2 reference samples and 1 new sample")
    device = next(selector.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ref_rows = _sample(n_reference, bank_size + query_size, generator)
    n_held = min(query_size, ref_rows.numel() // 2)  # small reference sets: split in halves
    n_bank = min(bank_size, ref_rows.numel() - n_held)
    bank_rows, held_rows = ref_rows[:n_bank], ref_rows[n_bank:n_bank + n_held]
    new_rows = _sample(n_new, query_size, generator)

    bank = gate_patterns(selector, take_reference(bank_rows).to(device))
    held = gate_patterns(selector, take_reference(held_rows).to(device))
    new = gate_patterns(selector, take_new(new_rows).to(device))

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
    rate_base *= noise_scale(int(new.shape[0]), int(held.shape[0]), int(bank.shape[0]))
    rate_ratio = rate_l1 / max(rate_base, 1e-6)
    volume = n_new / n_reference

    layers = _layer_rates(selector, take_reference(bank_rows[:1]).to(device), rate_bank, rate_held,
                          rate_new, noise_scale(int(new.shape[0]), int(held.shape[0]), int(bank.shape[0])))
    n_sampled = int(new.shape[0])
    recommend, reason = thresholds.decide({"rate_ratio": rate_ratio, "nn_ratio": nn_ratio,
                                           "far_fraction": far, "volume_ratio": volume}, n_sampled)
    return DriftReport(nn_hamming=nn_new, nn_hamming_baseline=baseline, nn_ratio=nn_ratio,
                       far_fraction=far, rate_l1=rate_l1, rate_l1_baseline=rate_base,
                       rate_ratio=rate_ratio, volume_ratio=volume, n_reference=int(bank.shape[0]),
                       n_new=n_sampled, recommend_full=recommend, reason=reason,
                       n_new_samples=n_new, judged=thresholds.judged(n_sampled), layers=layers)


def _layer_rates(selector: PathSelector, x_one: torch.Tensor, rate_bank: torch.Tensor,
                 rate_held: torch.Tensor, rate_new: torch.Tensor,
                 scale: float) -> list[dict[str, float | int]]:
    """Per gated layer: the firing-rate L1 (new vs bank), its held-out baseline, their ratio.

    Which layers' structure moved: under an input shift the first layer's rates move most,
    and only a layer whose ratio is high has gates worth re-learning (``mode=refresh``).
    """
    out: list[dict[str, float | int]] = []
    start = 0
    for (relu_index, param_index), size in zip(gate_layers(selector), gate_layer_sizes(selector, x_one),
                                               strict=True):
        sl = slice(start, start + size)
        start += size
        l1 = float((rate_new[sl] - rate_bank[sl]).abs().mean()) if size else 0.0
        base = (float((rate_held[sl] - rate_bank[sl]).abs().mean()) if size else 0.0) * scale
        out.append({"layer": relu_index, "param_layer": param_index, "gates": size, "rate_l1": l1,
                    "rate_l1_baseline": base, "rate_ratio": l1 / max(base, 1e-6)})
    return out
