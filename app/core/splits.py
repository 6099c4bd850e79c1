"""The stable holdout rule: a sample's role depends only on its id.

``mix(id) % m == 0`` → holdout (never trained on, used by the promotion gate),
``== 1`` → validation (early stopping), otherwise training. Because ids never change, the
champion and every later candidate are compared on the same rows, and a sample that was
holdout once stays holdout forever.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix(ids: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: well-spread, deterministic, independent of ingest order."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


@dataclass
class SplitMasks:
    train: np.ndarray
    val: np.ndarray
    holdout: np.ndarray


def split_masks(ids: np.ndarray, modulo: int) -> SplitMasks:
    bucket = mix(np.asarray(ids, dtype=np.int64)) % np.uint64(modulo)
    holdout = bucket == 0
    val = bucket == 1
    return SplitMasks(~(holdout | val), val, holdout)
