"""Device choice: CUDA when present, else CPU; overridable by name."""

from __future__ import annotations

import torch


def pick_device(name: str | None = None) -> torch.device:
    if name and name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
