"""Structure extraction, bit packing and caching."""

import numpy as np
import pytest
import torch

from app.core.network import PathSelector, ReLUNet
from app.core.spec import lenet5, mlp, vgg_small
from app.core.structure import (
    bytes_per_sample,
    gate_flip_fraction,
    pack,
    pack_bits,
    unpack,
    unpack_bits,
)


@pytest.mark.parametrize("width", [1, 7, 8, 9, 64, 1001])
def test_pack_bits_matches_numpy_and_roundtrips(width):
    bits = torch.rand(13, width) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), np.packbits(bits.numpy(), axis=1))
    assert torch.equal(unpack_bits(packed, width), bits)


@pytest.mark.parametrize("spec", [mlp([20, 16, 8, 3]), lenet5(8, 10), lenet5(28, 10),
                                  vgg_small(8, 10)], ids=lambda s: s.name)
def test_pack_unpack_structure_roundtrip(spec):
    selector = PathSelector(ReLUNet(spec, seed=0))
    x = torch.randn(11, spec.input_dim)
    structure = selector.structure(x)
    packed = pack(structure, selector.layout)
    assert packed.nbytes == 11 * bytes_per_sample(selector.layout)
    back = unpack(packed, selector.layout)
    for a, b in zip(structure.gates, back.gates, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(structure.pool_indices, back.pool_indices, strict=True):
        assert torch.equal(a, b)


def test_cached_structure_equals_recomputed_in_chunks():
    spec = lenet5(8, 10)
    selector = PathSelector(ReLUNet(spec, seed=0))
    x = torch.randn(50, 64)
    cached = selector.packed_structure(x, batch_size=7)
    direct = pack(selector.structure(x), selector.layout)
    assert torch.equal(cached.gate_bits, direct.gate_bits)
    for a, b in zip(cached.pool_choices, direct.pool_choices, strict=True):
        assert torch.equal(a, b)
    assert gate_flip_fraction(cached, direct) == 0.0


def test_gate_flip_fraction_counts_flips():
    spec = mlp([10, 16, 10])
    selector = PathSelector(ReLUNet(spec, seed=0))
    x = torch.randn(4, 10)
    a = pack(selector.structure(x), selector.layout)
    gates = selector.structure(x).gates
    gates[0][0, :4] = ~gates[0][0, :4]  # flip 4 of 64 gates
    from app.core.structure import Structure

    b = pack(Structure(gates, []), selector.layout)
    assert gate_flip_fraction(a, b) == pytest.approx(4 / 64)
