"""The kernel layout (baq_hf.kernels.layout): decodes to the stored codes, and its inverse is exact.

Property-based (hypothesis): random shapes, bitwidth histograms (1 column, 0-bit only, 8-bit only,
up to 15 bits), per-row and grouped ranges, and packed words drawn at random (so pad bits are not 0).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from baq_hf import format as fmt
from baq_hf.kernels.layout import RUN, TILE_FIELDS, build_layout, grid_bounds, stored_tensors


@st.composite
def stored_layers(draw):
    """Stored tensors of one layer: (qweight, bits_header, perm, range_min, range_max, group_index, M)."""
    m = draw(st.integers(1, 40))
    n = draw(st.integers(1, 80))
    kind = draw(st.sampled_from(["mixed", "zero_only", "eight_only", "one_width", "wide"]))
    if kind == "zero_only":
        bits = [0] * n
    elif kind == "eight_only":
        bits = [8] * n
    elif kind == "one_width":
        bits = [draw(st.integers(1, fmt.MAX_BITS))] * n
    else:
        top = 8 if kind == "mixed" else fmt.MAX_BITS
        bits = draw(st.lists(st.integers(0, top), min_size=n, max_size=n))
    stored_bits = torch.tensor(sorted(bits), dtype=torch.int64)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n_words = fmt.total_words(fmt.segments_from_bits(stored_bits, m), m)
    qweight = torch.randint(-(2**31), 2**31, (n_words,), generator=g, dtype=torch.int64).to(torch.int32)
    perm = torch.randperm(n, generator=g).to(torch.int32)
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    group_size = draw(st.sampled_from([-1, *divisors]))
    n_groups = 1 if group_size == -1 else n // group_size
    range_min = (-0.5 * torch.rand(m, n_groups, generator=g)).half()
    range_max = (0.01 + torch.rand(m, n_groups, generator=g)).half()
    group_index = None
    if group_size != -1:
        group_index = torch.randint(0, n_groups, (n,), generator=g, dtype=torch.int32)
    return qweight, fmt.pack_header(stored_bits), perm, range_min, range_max, group_index, m


def layout_codes(layout) -> torch.Tensor:
    """All codes (int64, M x N, storage order) read back from the layout by its documented addressing."""
    m = layout.out_features
    out = torch.zeros(m, layout.in_features, dtype=torch.int64)
    words = layout.codes.to(torch.int64) & 0xFFFFFFFF
    for s in layout.segments:
        if s.bits == 0:
            continue
        rows = words[s.word_row : s.word_row + s.n_word_rows].t()
        rows = torch.cat([rows, torch.zeros(m, 1, dtype=torch.int64)], 1)
        for c in range(s.n_cols):
            bit = c * s.bits
            pair = (rows[:, (bit >> 5) + 1] << 32) | rows[:, bit >> 5]
            out[:, s.col_start + c] = (pair >> (bit & 31)) & ((1 << s.bits) - 1)
    return out


def weight_of(layer: tuple) -> fmt.BaqWeight:
    """The packed weight of a drawn layer (stored tensors and the number of rows)."""
    qweight, header, perm, rmin, rmax, gidx, m = layer
    tensors = {"weight": qweight, "bits_header": header, "perm": perm, "range_min": rmin, "range_max": rmax}
    return fmt.BaqWeight(m, {**tensors, "group_index": gidx})


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(layer=stored_layers())
def test_layout_round_trip_is_exact(layer):
    qweight, header, perm, rmin, rmax, gidx, m = layer
    layout = build_layout(weight_of(layer))
    stored_bits = fmt.unpack_header(header, perm.numel())
    segments = fmt.segments_from_bits(stored_bits, m)
    # the layout holds the stored codes
    assert torch.equal(layout_codes(layout), fmt.unpack_codes(qweight, segments, m))
    # and gives back every stored tensor bit for bit, pad bits included
    back = stored_tensors(layout)
    assert torch.equal(back.qweight, qweight)
    assert torch.equal(back.bits_header, header)
    assert torch.equal(back.perm, perm)
    assert torch.equal(back.range_min, rmin) and torch.equal(back.range_max, rmax)
    assert (back.group_index is None) == (gidx is None)
    if gidx is not None:
        assert torch.equal(back.group_index, gidx)
    # layout -> stored -> layout is the identity too
    again = build_layout(back)
    assert torch.equal(again.codes, layout.codes) and again.pad_bits == layout.pad_bits
    # words past a row's last code are 0: the layout is as small as whole words allow
    per_row = sum(fmt.words_for(s.n_cols * s.bits) for s in segments)
    assert layout.codes.shape == (per_row, m)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(layer=stored_layers(), block_runs=st.sampled_from([1, 2, 4]))
def test_tile_table_covers_each_column_once(layer, block_runs):
    _, header, perm, *_ = layer
    layout = build_layout(weight_of(layer))
    block_k = RUN * block_runs
    for with_zero in (False, True):
        table, n_tiles = layout.tile_table(block_k, with_zero_bits=with_zero)
        assert table.shape == (n_tiles, TILE_FIELDS)
        seen = torch.zeros(layout.in_features, dtype=torch.int64)
        for bits, kcol0, ncols, wrow0, wrow_end in table.tolist():
            seg = next(s for s in layout.segments if s.col_start <= kcol0 < s.col_start + s.n_cols)
            assert bits == seg.bits and 0 < ncols <= block_k and kcol0 + ncols <= seg.col_start + seg.n_cols
            assert (kcol0 - seg.col_start) % block_k == 0  # tiles start on a run
            assert wrow0 == seg.word_row + (kcol0 - seg.col_start) * bits // RUN
            assert wrow_end == seg.word_row + seg.n_word_rows
            seen[kcol0 : kcol0 + ncols] += 1
        stored_bits = fmt.unpack_header(header, perm.numel())
        expected = torch.ones_like(seen) if with_zero else (stored_bits > 0).long()
        assert torch.equal(seen, expected)


def test_grid_bounds_match_format_grid():
    rmin = torch.tensor([[-1.0], [-0.25], [0.5]]).half()
    rmax = torch.tensor([[1.0], [2.0], [0.75]]).half()  # the last row does not contain 0: zero < 0
    max_zero, max_qz = grid_bounds(rmin, rmax, [3, 8])
    zeros = [fmt.grid(rmin, rmax, r)[1] for r in (3, 8)]
    assert max_zero == max(float(z.abs().max()) for z in zeros)
    assert max_qz >= max_zero and max_qz >= 255


def test_layout_rejects_bad_block_k():
    layout = build_layout(
        weight_of(
            (
                torch.zeros(1, dtype=torch.int32),
                fmt.pack_header(torch.tensor([1])),
                torch.zeros(1, dtype=torch.int32),
                torch.zeros(2, 1).half() - 1,
                torch.ones(2, 1).half(),
                None,
                2,
            )
        )
    )
    for bad in (0, 48):
        with pytest.raises(ValueError, match="multiple of 32"):
            layout.tile_table(bad)
