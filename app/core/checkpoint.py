"""Weights as safetensors bytes plus a JSON manifest. Never pickle."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app.core.network import DecoupledModel, Estimator, PathSelector, ReLUNet
from app.core.spec import ArchSpec


class ChecksumMismatch(ValueError):
    """Stored weights do not hash to the sha256 recorded with them."""


def net_to_bytes(net: ReLUNet) -> bytes:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    return st_save(tensors)


def net_from_bytes(spec: ArchSpec, data: bytes, expected_sha256: str | None = None) -> ReLUNet:
    if expected_sha256 is not None and sha256(data) != expected_sha256:
        raise ChecksumMismatch("weights do not match their recorded sha256")
    net = ReLUNet(spec)
    net.load_state_dict(st_load(data))
    return net


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_to_bytes(model: DecoupledModel) -> tuple[bytes, bytes]:
    """(selector bytes, estimator bytes)."""
    return net_to_bytes(model.selector.net), net_to_bytes(model.estimator.net)


def model_from_bytes(spec: ArchSpec, selector: bytes, estimator: bytes,
                     selector_sha256: str | None = None, estimator_sha256: str | None = None
                     ) -> DecoupledModel:
    sel = net_from_bytes(spec, selector, selector_sha256)
    est = net_from_bytes(spec, estimator, estimator_sha256)
    return DecoupledModel(PathSelector(sel), Estimator(est))


@dataclass
class Manifest:
    arch: dict[str, Any]
    role: str  # "selector" | "estimator" | "net"
    sha256: str
    parent: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)


def save_checkpoint(directory: Path, name: str, net: ReLUNet, role: str,
                    parent: str | None = None, metrics: dict[str, Any] | None = None) -> Manifest:
    directory.mkdir(parents=True, exist_ok=True)
    data = net_to_bytes(net)
    manifest = Manifest(net.spec.to_dict(), role, sha256(data), parent, metrics or {})
    (directory / f"{name}.safetensors").write_bytes(data)
    (directory / f"{name}.json").write_text(json.dumps(asdict(manifest), indent=2))
    return manifest


def load_checkpoint(directory: Path, name: str) -> tuple[ReLUNet, Manifest]:
    manifest = Manifest(**json.loads((directory / f"{name}.json").read_text()))
    data = (directory / f"{name}.safetensors").read_bytes()
    net = net_from_bytes(ArchSpec.from_dict(manifest.arch), data, manifest.sha256)
    return net, manifest
