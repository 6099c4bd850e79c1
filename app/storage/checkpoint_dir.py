"""A directory of model versions (safetensors + JSON manifests): the store before SQL."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from app.core.checkpoint import save_checkpoint
from app.core.network import DecoupledModel


class DirectoryRegistry:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or Path(os.environ.get("SKQK_DATA_DIR", "./skqk-data")) / "models")

    def versions(self) -> list[int]:
        return sorted(int(p.name[1:]) for p in self.root.glob("v*") if p.name[1:].isdigit())

    def register(self, model: DecoupledModel, mode: str, parent: int | None,
                 metrics: dict[str, Any]) -> int:
        version = max(self.versions(), default=0) + 1
        directory = self.root / f"v{version}"
        info = {**metrics, "mode": mode}
        parent_ref = f"v{parent}" if parent is not None else None
        save_checkpoint(directory, "selector", model.selector.net, "selector", parent_ref, info)
        save_checkpoint(directory, "estimator", model.estimator.net, "estimator", parent_ref, info)
        return version
