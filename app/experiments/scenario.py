"""Continual-retraining scenarios: old data (n samples), new data (m samples), maybe shifted.

A scenario takes a data set's training split, keeps the first ``1 - new_fraction`` of it as
the *old* data the current model was trained on, and turns the rest into the *new* data that
arrived since, optionally drawn from a shifted distribution:

* ``none`` — same distribution (the paper's n → n + m).
* ``brightness:B`` — images: ``clip(x + B, 0, 1)``; synthetic: inputs ``N(B, 1)`` instead of
  ``N(0, 1)``, labelled by the same teacher.
* ``contrast:C`` — images only: ``clip(C·x, 0, 1)`` (C < 1 fades the strokes).
* ``classfreq:F`` — label shift: a new sample of class ≥ K/2 is kept with probability F, so
  the new data over-represents the lower half of the classes.
* ``offset:B`` — synthetic only: the first quarter of the features drawn from ``N(B, 1)``, the
  rest unchanged (a sensor re-calibrated: a partial offset shift), same teacher.
* ``noise:S`` — images only: ``clip(x + S·ε, 0, 1)`` with ε ~ N(0, 1) per pixel (a noisier
  camera: the background's units fire at new rates, the strokes stay).

The validation split mixes old and new distribution in the proportion n : m (an operator's
holdout holds recent traffic too); ``test`` follows the new distribution, ``test_old`` is the
untouched original test split (to see forgetting).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from app.core.data import Dataset, Split, synthetic_arrays

SHIFT_KINDS = ("none", "brightness", "contrast", "classfreq", "offset", "noise")


@dataclass
class Scenario:
    name: str
    shift: str
    old: Split
    new: Split
    val: Split
    test: Split  # the new distribution
    test_old: Split
    num_classes: int

    @property
    def combined(self) -> Split:
        return Split.concat([self.old, self.new])


def parse_shift(shift: str) -> tuple[str, float]:
    kind, _, value = shift.partition(":")
    kind = kind.strip() or "none"
    if kind not in SHIFT_KINDS:
        raise ValueError(f"unknown shift {shift!r}; use none, brightness:B, contrast:C, classfreq:F, "
                         "offset:B (synthetic) or noise:S (images)")
    if kind == "none":
        return kind, 0.0
    try:
        return kind, float(value)
    except ValueError:
        raise ValueError(f"shift {shift!r} needs a number, e.g. {kind}:0.3") from None


def _class_filter(split: Split, keep_high: float, num_classes: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    high = split.y.numpy() >= num_classes // 2
    keep = ~high | (rng.random(len(split)) < keep_high)
    return split.subset(torch.from_numpy(np.flatnonzero(keep)))


def _image_transform(kind: str, value: float, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    if kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        return (x + value * torch.randn(x.shape, generator=gen)).clamp(0.0, 1.0)
    if kind == "brightness":
        return (x + value).clamp(0.0, 1.0)
    if kind == "contrast":
        return (x * value).clamp(0.0, 1.0)
    return x


def _synthetic_like(split: Split, value: float, seed: int, num_classes: int, partial: bool = False) -> Split:
    dim = split.x.shape[1]
    shift = np.where(np.arange(dim) < max(1, dim // 4), value, 0.0).astype(np.float32) if partial else value
    x, y = synthetic_arrays(len(split), dim=dim, num_classes=num_classes, seed=seed, shift=shift)
    return Split(torch.from_numpy(x), torch.from_numpy(y))


def shift_split(split: Split, shift: str, dataset: str, num_classes: int, seed: int) -> Split:
    """The same number of samples (fewer for classfreq) drawn from the shifted distribution."""
    kind, value = parse_shift(shift)
    if kind == "none":
        return split
    if kind == "classfreq":
        return _class_filter(split, value, num_classes, seed)
    if dataset == "synthetic":
        if kind not in ("brightness", "offset"):
            raise ValueError("synthetic data supports the shifts none, brightness:B, offset:B and "
                             "classfreq:F")
        return _synthetic_like(split, value, seed, num_classes, partial=kind == "offset")
    if kind == "offset":
        raise ValueError("offset:B is a synthetic-data shift; images take brightness:B or noise:S")
    return Split(_image_transform(kind, value, split.x, seed), split.y)


def build_scenario(data: Dataset, new_fraction: float = 0.2, shift: str = "none", seed: int = 0
                   ) -> Scenario:
    if not 0.0 < new_fraction < 1.0:
        raise ValueError("new_fraction must be in (0, 1)")
    n_train = len(data.train)
    n_old = round(n_train * (1.0 - new_fraction))
    old = data.train.subset(slice(0, n_old))
    new = shift_split(data.train.subset(slice(n_old, n_train)), shift, data.name, data.num_classes,
                      seed + 101)
    n_val_new = round(len(data.val) * new_fraction)
    val_new = shift_split(data.val.subset(slice(len(data.val) - n_val_new, len(data.val))), shift,
                          data.name, data.num_classes, seed + 202)
    val = Split.concat([data.val.subset(slice(0, len(data.val) - n_val_new)), val_new])
    test = shift_split(data.test, shift, data.name, data.num_classes, seed + 303)
    name = f"{data.name}:{shift}:new={new_fraction:g}"
    return Scenario(name, shift, old, new, val, test, data.test, data.num_classes)
