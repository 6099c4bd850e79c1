"""NPZ files whose headers lie (issue 20, items 4 and 5), through every path that reads a data
file: ``skqk init --data``, ``skqk ingest``, ``skqk import --data`` and the server's bootstrap
from ``SKQK_BOOTSTRAP_DATA``, each a real subprocess under an address-space limit (before the
fix a 400-byte file declaring (1, 2^40) took ``init`` to 21.7 GB, (2, 2^62, 2^62) spun, and
10^12 declared rows over 408 KB of zeros stored 6.5 M rows before failing). Each must be
refused up front, naming the mismatch, with nothing stored."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers.server import REPO, copy_store, fast_env
from tests.hostile.files import many_rows_npz, spinning_npz, tiny_huge_npz
from tests.owndata.conftest import sample_count

ADDRESS_SPACE = 6 << 30  # a normal init stays far below; the old behaviour hits it at once


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_limited(data_dir: Path, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    environ = fast_env(data_dir, **env)
    environ["COLUMNS"] = "200"
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, env=environ, timeout=timeout,
                          capture_output=True, text=True, check=False, preexec_fn=_limit)


FILES = {"tiny-declares-2^40-features": tiny_huge_npz, "declares-2^124-features": spinning_npz,
         "declares-10^12-rows": many_rows_npz}
REASONS = {"tiny-declares-2^40-features": "values per row", "declares-2^124-features": "values per row",
           "declares-10^12-rows": "the header does not match the data"}


def _said(run: subprocess.CompletedProcess, name: str) -> str:
    out = " ".join((run.stdout + run.stderr).split())
    assert REASONS[name] in out, out[-3000:]
    assert "MemoryError" not in out, out[-3000:]
    return out


@pytest.mark.parametrize("name", list(FILES))
def test_init_refuses_lying_npz(tmp_path: Path, name: str) -> None:
    path = FILES[name](tmp_path / "evil.npz")
    data_dir = tmp_path / "data"
    run = run_limited(data_dir, "init", "--data", str(path), "--label-column", "y", "--arch", "mlp:8",
                      "--epochs", "1", "--device", "cpu")
    _said(run, name)
    assert run.returncode == 2
    assert sample_count(data_dir) == 0


@pytest.mark.parametrize("name", list(FILES))
def test_ingest_refuses_lying_npz(template_data_dir: Path, tmp_path: Path, name: str) -> None:
    data_dir = copy_store(template_data_dir, tmp_path / "data")
    before = sample_count(data_dir)
    path = (many_rows_npz(tmp_path / "evil.npz", features=64) if name == "declares-10^12-rows"
            else FILES[name](tmp_path / "evil.npz"))
    run = run_limited(data_dir, "ingest", str(path))
    _said(run, name)
    assert run.returncode == 1
    assert sample_count(data_dir) == before


@pytest.mark.parametrize("name", list(FILES))
def test_import_data_refuses_lying_npz(tmp_path: Path, name: str) -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    model = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 4),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), model)
    path = FILES[name](tmp_path / "evil.npz")
    data_dir = tmp_path / "data"
    run = run_limited(data_dir, "import", str(model), "--data", str(path), "--label-column", "y")
    _said(run, name)
    assert run.returncode == 2
    assert sample_count(data_dir) == 0


@pytest.mark.parametrize("name", ["tiny-declares-2^40-features", "declares-10^12-rows"])
def test_bootstrap_refuses_lying_npz(tmp_path: Path, name: str) -> None:
    path = FILES[name](tmp_path / "evil.npz")
    data_dir = tmp_path / "data"
    run = run_limited(data_dir, "serve", "--port", "0", timeout=120, SKQK_BOOTSTRAP_DATA=str(path),
                      SKQK_BOOTSTRAP_LABEL_COLUMN="y")
    _said(run, name)
    assert run.returncode == 2 and "Traceback" not in run.stdout + run.stderr
    assert sample_count(data_dir) == 0


def test_honest_npz_still_reads(tmp_path: Path) -> None:
    gen = np.random.default_rng(0)
    for name, save in (("plain.npz", np.savez), ("deflated.npz", np.savez_compressed)):
        save(tmp_path / name, x=gen.random((300, 4)).astype(np.float32), y=np.arange(300) % 3)
        data_dir = tmp_path / f"data-{name}"
        run = run_limited(data_dir, "init", "--data", str(tmp_path / name), "--label-column", "y",
                          "--arch", "mlp:8", "--epochs", "1", "--device", "cpu")
        assert run.returncode == 0, run.stdout + run.stderr
        assert sample_count(data_dir) == 300
