"""Structural knowledge (SK) of a batch: activation pieces and max-pool choices, plus a packed form.

Packed form, per sample: every gate as one bit (all activation layers concatenated,
row-major), and every max-pool choice as the position inside its window (one uint8). That is
what gets cached for a training set and shipped between processes. A 3-piece layer (ReLU6,
Hardtanh) takes two bits per unit, a thermometer code: the plane 1[piece ≥ 1] then the plane
1[piece ≥ 2] (so its Hamming distance is |Δpiece|); a net with only 2-piece activations
(plain ReLU included) has exactly the bits it always had.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from app.core.spec import StructureLayout

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


@dataclass
class Structure:
    """Unpacked SK of a batch: one bool tensor per ReLU, one int64 index tensor per max-pool.

    ``pool_indices`` hold flat indices into each pooled plane (torch's ``max_pool2d``
    ``return_indices`` convention) so the estimator can gather directly.
    """

    gates: list[torch.Tensor]  # bool per 2-piece layer, uint8 piece index (0, 1, 2) per 3-piece layer
    pool_indices: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return int(self.gates[0].shape[0]) if self.gates else int(self.pool_indices[0].shape[0])

    def to(self, device: torch.device | str) -> Structure:
        return Structure([g.to(device) for g in self.gates], [p.to(device) for p in self.pool_indices])

    def index(self, rows: torch.Tensor | slice) -> Structure:
        return Structure([g[rows] for g in self.gates], [p[rows] for p in self.pool_indices])


@dataclass
class PackedStructure:
    """Compact SK of N samples: ``gate_bits`` uint8[N, ceil(G/8)], pool choices uint8[N, …]."""

    gate_bits: torch.Tensor
    pool_choices: list[torch.Tensor]
    num_gates: int
    # (units, bits per unit) of each activation layer, only when some layer has 3 pieces
    # (None: one bit per unit throughout, the plain-ReLU layout)
    segments: tuple[tuple[int, int], ...] | None = None

    def __len__(self) -> int:
        return int(self.gate_bits.shape[0])

    def index(self, rows: torch.Tensor | slice) -> PackedStructure:
        return PackedStructure(self.gate_bits[rows], [p[rows] for p in self.pool_choices],
                               self.num_gates, self.segments)

    def to(self, device: torch.device | str) -> PackedStructure:
        return PackedStructure(self.gate_bits.to(device), [p.to(device) for p in self.pool_choices],
                               self.num_gates, self.segments)

    @property
    def num_units(self) -> int:
        return self.num_gates if self.segments is None else sum(u for u, _ in self.segments)

    def unit_changes(self, other: PackedStructure) -> torch.Tensor:
        """bool[N, units]: which units are on a different piece in ``other`` (same samples)."""
        diff = unpack_bits(self.gate_bits ^ other.gate_bits, self.num_gates)
        if self.segments is None:
            return diff
        parts, start = [], 0
        for units, bits in self.segments:
            seg = diff[:, start:start + units * bits]
            parts.append(seg.view(seg.shape[0], bits, units).any(dim=1))
            start += units * bits
        return torch.cat(parts, dim=1)

    @property
    def nbytes(self) -> int:
        return self.gate_bits.numel() + sum(p.numel() for p in self.pool_choices)

    @staticmethod
    def concat(parts: list[PackedStructure]) -> PackedStructure:
        pools = [torch.cat(ps) for ps in zip(*[p.pool_choices for p in parts], strict=True)]
        return PackedStructure(torch.cat([p.gate_bits for p in parts]), pools, parts[0].num_gates,
                               parts[0].segments)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool[N, G] → uint8[N, ceil(G/8)], most significant bit first (like numpy.packbits)."""
    n, g = bits.shape
    pad = (-g) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    grouped = bits.view(n, -1, 8).to(torch.uint8)
    return (grouped * _BIT_WEIGHTS.to(bits.device)).sum(dim=2, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, num_bits: int) -> torch.Tensor:
    """uint8[N, B] → bool[N, num_bits]; inverse of :func:`pack_bits`."""
    weights = _BIT_WEIGHTS.to(packed.device)
    bits = (packed.unsqueeze(2) & weights) != 0
    return bits.view(packed.shape[0], -1)[:, :num_bits]


def _window_origin(out_shape: tuple[int, ...], stride: tuple[int, int], padding: tuple[int, int],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input row and column of the top-left corner of every pooling window ([Ho, 1], [1, Wo])."""
    ho, wo = out_shape[1], out_shape[2]
    rows = torch.arange(ho, device=device) * stride[0] - padding[0]
    cols = torch.arange(wo, device=device) * stride[1] - padding[1]
    return rows[:, None], cols[None, :]


def _geoms(layout: StructureLayout) -> list[tuple[int, tuple[int, int], tuple[int, int]]]:
    """(window width, strides, paddings) per max-pool."""
    if layout.pool_geoms:
        return [(g.kw, (g.sh, g.sw), (g.pt, g.pl)) for g in layout.pool_geoms]
    return [(k, (s, s), (p, p)) for k, s, p in layout.pool_windows]


def _segments(layout: StructureLayout) -> tuple[tuple[int, int], ...] | None:
    if layout.single_bit:
        return None
    return tuple((math.prod(s), 1 if p == 2 else 2) for s, p in zip(layout.gate_shapes, layout.gate_pieces,
                                                                    strict=True))


def pack(structure: Structure, layout: StructureLayout) -> PackedStructure:
    n = structure.batch_size
    if structure.gates and layout.single_bit:
        flat = torch.cat([g.reshape(n, -1) for g in structure.gates], dim=1)
    elif structure.gates:  # 3-piece layers: two thermometer planes each
        planes = []
        for g, p in zip(structure.gates, layout.gate_pieces, strict=True):
            g = g.reshape(n, -1)
            planes += [g] if p == 2 else [g >= 1, g >= 2]
        flat = torch.cat([pl.bool() for pl in planes], dim=1)
    else:
        flat = torch.zeros(n, 0, dtype=torch.bool, device=structure.pool_indices[0].device)
    choices = []
    for idx, in_shape, out_shape, (k, s, p) in zip(structure.pool_indices, layout.pool_in_shapes,
                                                   layout.pool_out_shapes, _geoms(layout), strict=True):
        in_w = in_shape[2]
        row0, col0 = _window_origin(out_shape, s, p, idx.device)
        local = (idx // in_w - row0) * k + (idx % in_w - col0)  # position inside the window
        choices.append(local.to(torch.uint8))
    return PackedStructure(pack_bits(flat), choices, flat.shape[1], _segments(layout))


def unpack(packed: PackedStructure, layout: StructureLayout) -> Structure:
    n = len(packed)
    flat = unpack_bits(packed.gate_bits, packed.num_gates)
    gates, start = [], 0
    pieces = layout.gate_pieces or [2] * len(layout.gate_shapes)
    for shape, p in zip(layout.gate_shapes, pieces, strict=True):
        size = math.prod(shape)
        if p == 2:
            gates.append(flat[:, start:start + size].reshape(n, *shape))
        else:
            lo, hi = flat[:, start:start + size], flat[:, start + size:start + 2 * size]
            gates.append((lo.to(torch.uint8) + hi.to(torch.uint8)).reshape(n, *shape))
            size *= 2
        start += size
    indices = []
    for local, in_shape, out_shape, (k, s, p) in zip(packed.pool_choices, layout.pool_in_shapes,
                                                     layout.pool_out_shapes, _geoms(layout), strict=True):
        in_w = in_shape[2]
        local = local.to(torch.int64)
        row0, col0 = _window_origin(out_shape, s, p, local.device)
        indices.append((row0 + local // k) * in_w + col0 + local % k)
    return Structure(gates, indices)


def gate_flip_fraction(a: PackedStructure, b: PackedStructure) -> float:
    """Fraction of units on a different linear piece (for ReLU: normalised Hamming distance of
    the gates) between two structures of the same samples."""
    if a.num_gates == 0:
        return 0.0
    return float(a.unit_changes(b).float().mean())


def pool_flip_fraction(a: PackedStructure, b: PackedStructure) -> float:
    """Fraction of max-pool windows whose chosen element differs."""
    total = sum(p.numel() for p in a.pool_choices)
    if total == 0:
        return 0.0
    changed = sum(int((pa != pb).sum()) for pa, pb in zip(a.pool_choices, b.pool_choices, strict=True))
    return changed / total


def bytes_per_sample(layout: StructureLayout) -> int:
    return math.ceil(layout.num_gates / 8) + sum(math.prod(s) for s in layout.pool_out_shapes)
