"""Per-rank slices of a packed layer (baq_hf.sharding) against the single-rank layer, bit for bit."""

from __future__ import annotations

import pytest
import torch

from baq_hf import BaqLinear
from baq_hf import format as fmt
from baq_hf.sharding import select_columns, select_rows


def packed_layer(m: int, n: int, group_size: int, shuffled_groups: bool, seed: int) -> fmt.BaqWeight:
    """A random packed weight: bitwidths 0-8 (dropped columns included), optional groups."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 9, (n,), generator=g)
    codes = torch.randint(0, 1 << 16, (m, n), generator=g) % (1 << bits)
    rmin = -torch.rand(m, 1 if group_size == -1 else n // group_size, generator=g) - 0.1
    rmax = torch.rand(rmin.shape, generator=g) + 0.1
    groups = None
    if group_size != -1:
        groups = torch.arange(n) // group_size
        if shuffled_groups:  # act_order: groups in Hessian order, scattered over the input columns
            groups = groups[torch.randperm(n, generator=g)]
    return fmt.BaqWeight.pack(codes, bits, rmin, rmax, groups)


# (out, in, group_size, groups scattered as with act_order)
CASES = [(24, 64, -1, False), (24, 64, 16, False), (24, 64, 16, True), (12, 96, 32, True), (9, 36, -1, False)]


@pytest.mark.parametrize(("m", "n", "group_size", "shuffled"), CASES)
@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_slices_dequantize_to_the_weights_columns(m, n, group_size, shuffled, tp):
    weight = packed_layer(m, n, group_size, shuffled, seed=m + n + tp)
    full = BaqLinear.from_packed(weight).dequantize()
    width = n // tp
    x = torch.randn(3, n, dtype=torch.float64)
    partial = torch.zeros(3, m, dtype=torch.float64)
    for rank in range(tp):
        part = BaqLinear.from_packed(select_columns(weight, rank * width, (rank + 1) * width))
        w = part.dequantize()
        assert torch.equal(w, full[:, rank * width : (rank + 1) * width])
        partial += x[:, rank * width : (rank + 1) * width] @ w.double().T  # what the all-reduce sums
    torch.testing.assert_close(partial, x @ full.double().T)


@pytest.mark.parametrize(("m", "n", "group_size", "shuffled"), CASES)
@pytest.mark.parametrize("tp", [3])
def test_column_parallel_slices_dequantize_to_the_weights_rows(m, n, group_size, shuffled, tp):
    weight = packed_layer(m, n, group_size, shuffled, seed=m * n + tp)
    full = BaqLinear.from_packed(weight).dequantize()
    rows = m // tp
    parts = [
        BaqLinear.from_packed(select_rows(weight, r * rows, (r + 1) * rows)).dequantize() for r in range(tp)
    ]
    assert torch.equal(torch.cat(parts), full)


def test_column_slice_of_a_row_slice_is_the_block():
    weight = packed_layer(12, 48, 8, True, seed=3)
    full = BaqLinear.from_packed(weight).dequantize()
    block = select_columns(select_rows(weight, 4, 8), 24, 48)
    assert torch.equal(BaqLinear.from_packed(block).dequantize(), full[4:8, 24:48])


def test_slices_outside_the_layer_are_refused():
    weight = packed_layer(8, 16, -1, False, seed=0)
    with pytest.raises(ValueError, match="outside the layer's 8 output rows"):
        select_rows(weight, 4, 12)
    with pytest.raises(ValueError, match="outside the layer's 16 input columns"):
        select_columns(weight, 8, 8)
