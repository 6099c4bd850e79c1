"""Piecewise-linear activations: which linear piece a unit is on, and that piece's map.

The decoupling needs activations that are piecewise linear, not ReLU specifically. For each
unit the structural knowledge is the index of its piece; given it, the unit is affine:

==============  ======  ==========================================  =====================
layer           pieces  piece index (selector, pre-activation z)    estimator, piece → h
==============  ======  ==========================================  =====================
relu            2       1[z > 0] (bool)                             0 | z
leaky_relu(α)   2       1[z > 0] (bool)                             α·z | z
prelu(α_c)      2       1[z > 0] (bool)                             α_c·z | z (α: estimator's)
hardtanh(a, b)  3       1[z > a] + 1[z ≥ b] (uint8: 0, 1, 2)         a | z | b
==============  ======  ==========================================  =====================

ReLU6 is hardtanh(0, 6); clip with constant bounds is hardtanh too (an open bound is
``None`` and its piece is never taken). At a breakpoint both pieces give the same value, so
the convention there does not change outputs. The estimator's map is written with
``torch.where`` on the piece index, so with equal weights it returns the very values the
plain activation returns (``F.leaky_relu``/``F.prelu``/``clamp`` compute the same selects).
Pieces may arrive as bool, integer or float tensors (the QK cache keeps float masks).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

TWO_PIECE = {"relu", "leaky_relu", "prelu"}


def num_pieces(layer: dict[str, Any]) -> int:
    return 3 if layer["type"] == "hardtanh" else 2


def bounds(layer: dict[str, Any]) -> tuple[float, float]:
    lo, hi = layer.get("min"), layer.get("max")
    return (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))


def make_block(layer: dict[str, Any], channels: int) -> nn.Module:
    """The module that holds the activation's parameters (PReLU's slopes), else an Identity."""
    if layer["type"] == "prelu":
        n = int(layer.get("num_parameters", 1))
        return nn.PReLU(n, init=float(layer.get("init", 0.25)))
    return nn.Identity()


def _prelu_slope(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    w = block.weight.to(h.dtype)  # type: ignore[union-attr]
    per_channel = int(getattr(block, "num_parameters", 1)) > 1  # a Python int, also under tracing
    return w.reshape(-1, *([1] * (h.dim() - 2))) if per_channel else w.reshape(())


def plain(layer: dict[str, Any], block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The ordinary activation (what the source network computes)."""
    kind = layer["type"]
    if kind == "leaky_relu":
        return F.leaky_relu(h, float(layer.get("alpha", 0.01)))
    if kind == "prelu":
        return torch.where(h > 0, h, h * _prelu_slope(block, h))
    if kind == "hardtanh":
        lo, hi = bounds(layer)
        return h.clamp(None if lo == -math.inf else lo, None if hi == math.inf else hi)
    return F.relu(h)


def piece(layer: dict[str, Any], z: torch.Tensor) -> torch.Tensor:
    """The piece index of every unit, from its pre-activation (bool for 2 pieces, uint8 for 3)."""
    if layer["type"] == "hardtanh":
        lo, hi = bounds(layer)
        return (z > lo).to(torch.uint8) + (z >= hi).to(torch.uint8)
    return z > 0


def gated(layer: dict[str, Any], block: nn.Module, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The estimator's activation: the map of piece ``p`` applied to its own ``h`` (affine in h)."""
    kind = layer["type"]
    if kind == "hardtanh":
        lo, hi = bounds(layer)
        # an open bound's piece never occurs; 0 keeps the select finite
        const = torch.where(p == 0, lo if lo != -math.inf else 0.0, hi if hi != math.inf else 0.0)
        return torch.where(p == 1, h, const.to(h.dtype))
    on = p if p.dtype == torch.bool else p != 0
    if kind == "leaky_relu":
        return torch.where(on, h, h * float(layer.get("alpha", 0.01)))
    if kind == "prelu":
        return torch.where(on, h, h * _prelu_slope(block, h))
    return h * p.to(h.dtype)
