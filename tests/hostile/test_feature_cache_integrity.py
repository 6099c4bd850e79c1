"""A damaged feature cache is never used (issue 20, item 3). ``skqk retrain --mode qk`` (a real
subprocess) builds the cache; the test then damages a cached block on disk the ways an
outside fault would (rows of ``phi.npy`` permuted with a valid header and finite values, the
block scaled by 3, the file truncated) and retrains again: the block must be detected,
recomputed (bit-identical to the original) and counted, and the retrain must succeed.
Before the fix, permuted/scaled blocks were used as they were and a truncated one failed
every later retrain with ``mmap length is greater than file size``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.server import copy_store
from tests.owndata.conftest import skqk


def _retrain(data_dir: Path) -> dict:
    run = skqk(data_dir, "retrain", "--mode", "qk", "--force")
    assert run.returncode in (0, 3), run.stdout + run.stderr  # promoted or not: it ran to the end
    out = run.stdout
    return json.loads(out[out.index("\n{") + 1:])


def _phi_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "feature-cache").glob("*/*/phi.npy"))


def _permute(path: Path) -> None:
    phi = np.load(path, mmap_mode="r+")
    phi[:] = phi[np.random.default_rng(0).permutation(len(phi))]  # valid header, finite values
    phi.flush()


def _scale(path: Path) -> None:
    phi = np.load(path, mmap_mode="r+")
    phi *= 3
    phi.flush()


def _truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize("damage", [_permute, _scale, _truncate], ids=["permuted", "scaled", "truncated"])
def test_a_damaged_cache_block_is_recomputed_not_used(template_data_dir: Path, tmp_path: Path,
                                                      damage) -> None:
    data_dir = copy_store(template_data_dir, tmp_path / "data")
    first = _retrain(data_dir)
    assert first["feature_cache"]["blocks_computed"] >= 1
    files = _phi_files(data_dir)
    assert files, "no cached block on disk"
    original = files[0].read_bytes()

    damage(files[0])
    assert files[0].read_bytes() != original
    second = _retrain(data_dir)
    stats = second["feature_cache"]
    assert stats["blocks_corrupt"] == 1, stats
    assert stats["blocks_computed"] == 1
    assert stats["blocks_reused"] == first["feature_cache"]["blocks_computed"] - 1
    assert files[0].read_bytes() == original  # recomputed: the features the network gives, bit for bit
    assert second["n_holdout"] == first["n_holdout"]
    assert second["champion"]["holdout_acc"] > 0.5, second

    third = _retrain(data_dir)  # and the repaired block is trusted again
    assert third["feature_cache"]["blocks_corrupt"] == 0 and third["feature_cache"]["blocks_computed"] == 0
