"""`skqk import` of a hostile ``.pt2``: a real ``torch.export.save`` archive whose pickled parts
would run a shell command. The CLI (a real subprocess) must refuse it with exit 2, run nothing
and store nothing (issue 20, item 1). The archives are built here, never committed."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.owndata.conftest import sample_count, skqk


class _Payload:
    """Pickles as ``os.system(command)``: what an attacker would put in the archive."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _evil_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(_Payload(f"touch {marker}"), buf)  # torch.save's own zip format, like the real entry
    return buf.getvalue()


def _archive(path: Path) -> None:
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    torch.export.save(torch.export.export(net, (torch.randn(4, 6),)), path)


def _rewrite(path: Path, change) -> None:
    """Rewrite the zip with ``change(inner_name, bytes) -> bytes`` applied to every entry."""
    with zipfile.ZipFile(path) as zf:
        entries = [(info, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for info, raw in entries:
            zf.writestr(info.filename, change(info.filename.split("/", 1)[1], raw))


def _sample_inputs(marker: Path):
    def change(name: str, raw: bytes) -> bytes:
        return _evil_bytes(marker) if name.startswith("data/sample_inputs/") else raw
    return change


def _pickled_weight(marker: Path):
    def change(name: str, raw: bytes) -> bytes:
        if name == "data/weights/model_weights_config.json":
            config = json.loads(raw)
            config["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        if name == "data/weights/weight_0":
            return _evil_bytes(marker)
        return raw
    return change


@pytest.mark.parametrize("where", ["sample_inputs", "pickled_weight"])
def test_hostile_pt2_runs_nothing_stores_nothing(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt2"
    _archive(path)
    _rewrite(path, {"sample_inputs": _sample_inputs, "pickled_weight": _pickled_weight}[where](marker))
    np.savez(tmp_path / "d.npz", x=np.random.rand(40, 6).astype(np.float32), y=np.zeros(40, dtype=np.int64))
    data_dir = tmp_path / "data"
    run = skqk(data_dir, "import", str(path), "--data", str(tmp_path / "d.npz"), "--label-column", "y")
    out = " ".join((run.stdout + run.stderr).split())
    assert not marker.exists(), f"the archive's command ran: {out}"
    assert run.returncode == 2, out
    assert "could run code" in out and "Traceback" not in out, out
    assert sample_count(data_dir) == 0


def test_clean_pt2_still_imports(tmp_path: Path) -> None:
    path = tmp_path / "ok.pt2"
    _archive(path)
    run = skqk(tmp_path / "data", "import", str(path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "version 1 (active)" in run.stdout
