"""The kernel layout of a BaqLinear: the stored codes rearranged for bandwidth, with its exact inverse.

The stored format (:mod:`baq_hf.format`) packs each bitwidth segment as one row-major bitstream, so a
row's codes start at an arbitrary bit and the output dimension is the slow one. GPU kernels want the
opposite: a 16-byte load should bring 4 *output* rows' words, and the words of one output row should
be word-aligned so that a run of 32 codes of R bits is exactly R whole words. The kernel layout is
built on the device at load time from the stored tensors (plain torch ops, tensors in / tensors out):

- ``codes`` (int32, ``[word_rows, out_features]``, output dimension contiguous): for every segment
  with R >= 1 bits (in increasing R, as stored), the bitstream of each output row, re-aligned to start
  at word 0, occupies word rows ``word_row .. word_row + ceil(n_cols * R / 32)``. Word ``u`` of row ``i``
  holds bits ``32u .. 32u + 31`` of the row's codes (code ``c`` at bits ``c*R .. c*R + R - 1``), so the
  ``j``-th run of 32 columns is words ``j*R .. j*R + R - 1``; the last run of a segment is as short as
  its codes allow (its unused high bits are 0), which keeps the layout within ~1% of the stored size.
- ``colmap`` (int32, ``[in_features]``): the input column of every kernel column. Kernel columns are
  the stored columns (sorted by bitwidth), so this is ``perm`` itself; 0-bit columns come first and
  store no codes.
- ``group_of`` (int32, ``[in_features]``, grouped layers only): ``group_index``.
- ``range_min`` / ``range_max`` (fp16, ``[out_features, G]``), ``bits_header``: the stored tensors.
- per segment, the stored stream's pad bits above the last code (``pad_bits``), so that
  :func:`stored_tensors` gives back the stored tensors bit for bit.

Tile tables (:meth:`KernelLayout.tile_table`) cut every segment into tiles of ``block_k`` columns (a
multiple of 32, so tiles start on a run) that never cross a segment: the kernels' K tiles.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

import torch

from .. import format as fmt

# Bits of a tile table row: bits, first kernel column, columns in the tile, first word row, and the
# end (exclusive) of the segment's word rows, which bounds the word loads of a short last run.
TILE_FIELDS = 5
RUN = 32  # columns per run: a run of R-bit codes is exactly R words
_WORDS_PER_CHUNK = 1 << 21  # int64 temporaries of the repacking, per chunk of rows
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class LayoutSegment:
    """A stored segment (columns ``col_start .. col_start + n_cols`` of one bitwidth) in the layout."""

    bits: int
    col_start: int
    n_cols: int
    word_row: int  # first word row of its codes (R >= 1)

    @property
    def n_word_rows(self) -> int:
        """Words per output row: ceil(n_cols * bits / 32)."""
        return fmt.words_for(self.n_cols * self.bits)


@dataclass(eq=False)
class KernelLayout:
    """Device tensors the kernels read, and the host-side facts that select kernel variants."""

    device: torch.device  # a plain field: compiled code checks it without touching a tensor
    codes: torch.Tensor
    colmap: torch.Tensor
    group_of: torch.Tensor | None
    range_min: torch.Tensor
    range_max: torch.Tensor
    bits_header: torch.Tensor
    pad_bits: tuple[int, ...]
    segments: tuple[LayoutSegment, ...]
    out_features: int
    in_features: int
    # max over rows, groups and present bitwidths of |zero| and of |q - zero| (see grid_bounds)
    max_abs_zero: float
    max_abs_qz: float
    tile_tables: dict[tuple[int, bool], tuple[torch.Tensor, int]] = field(default_factory=dict, repr=False)
    # set and filled by baq_hf.kernels: the key of torch.ops.baq_hf.linear, the chosen launch configs
    op_key: int = 0
    launch_configs: dict = field(default_factory=dict, repr=False)

    @property
    def grouped(self) -> bool:
        return self.group_of is not None

    @property
    def n_groups(self) -> int:
        return self.range_min.shape[1]

    @property
    def widths(self) -> int:
        """Bitmask of the bitwidths the GEMV compiles code for: every R from the smallest to the largest
        >= 1 present, so that layers with similar histograms share one compiled kernel."""
        present = [s.bits for s in self.segments if s.bits]
        return sum(1 << r for r in range(min(present), max(present) + 1)) if present else 0

    @property
    def max_bits(self) -> int:
        return max((s.bits for s in self.segments), default=0)

    @property
    def zero_fold_exact(self) -> bool:
        """(2^23 + q) - (2^23 + zero) == q - zero in fp32 for every code: the GEMV's one-add decode."""
        return self.max_abs_zero < 2**22

    def qz_exact_in(self, dtype: torch.dtype) -> bool:
        """Every q - zero is an integer that ``dtype`` represents exactly (fp16: |v| <= 2048, bf16: 256)."""
        limit = {torch.float16: 2048, torch.bfloat16: 256, torch.float32: 2**24}[dtype]
        return self.max_abs_qz <= limit

    def nbytes(self) -> int:
        """Bytes of the layout's own tensors (shared ones, such as colmap = perm, counted too)."""
        tensors = [self.codes, self.colmap, self.range_min, self.range_max, self.bits_header]
        if self.group_of is not None:
            tensors.append(self.group_of)
        return sum(t.numel() * t.element_size() for t in tensors)

    def tile_table(self, block_k: int, with_zero_bits: bool = False) -> tuple[torch.Tensor, int]:
        """int32 ``[n_tiles, TILE_FIELDS]`` table of K tiles of ``block_k`` columns, and ``n_tiles``.

        0-bit segments get tiles only ``with_zero_bits`` (the dequantizer writes their zeros; the
        products skip them). Built once per (block_k, flag) and cached on the device.
        """
        if block_k <= 0 or block_k % RUN:
            raise ValueError(f"block_k must be a positive multiple of {RUN}, got {block_k}")
        key = (block_k, with_zero_bits)
        if key not in self.tile_tables:
            rows = [
                [
                    s.bits,
                    c0,
                    min(block_k, s.col_start + s.n_cols - c0),
                    s.word_row + (c0 - s.col_start) * s.bits // RUN,
                    s.word_row + s.n_word_rows,
                ]
                for s in self.segments
                if s.bits or with_zero_bits
                for c0 in range(s.col_start, s.col_start + s.n_cols, block_k)
            ]
            table = torch.tensor(rows, dtype=torch.int32).reshape(-1, TILE_FIELDS)
            self.tile_tables[key] = (table.to(self.device), len(rows))
        return self.tile_tables[key]


def grid_bounds(range_min: torch.Tensor, range_max: torch.Tensor, widths: list[int]) -> tuple[float, float]:
    """(max |zero|, max |q - zero|) over all rows, groups and the given bitwidths (format.grid's zero)."""
    max_zero = max_qz = 0.0
    for r in widths:
        _, zero = fmt.grid(range_min, range_max, r)
        levels = float((1 << r) - 1)
        max_zero = max(max_zero, float(zero.abs().max()) if zero.numel() else 0.0)
        if zero.numel():
            max_qz = max(max_qz, float(torch.maximum(zero.abs(), (levels - zero).abs()).max()))
    return max_zero, max_qz


def build_layout(weight: fmt.BaqWeight) -> KernelLayout:
    """The kernel layout of a validated packed weight, on its device (see the module doc).

    Only ``codes`` is a new tensor; the others are the stored tensors themselves, referenced.
    """
    qweight, bits_header, perm = weight.qweight, weight.bits_header, weight.perm
    range_min, range_max, group_index = weight.range_min, weight.range_max, weight.group_index
    out_features = weight.out_features
    device = qweight.device
    m = out_features
    n = perm.numel()
    layout_segments = []
    pad_bits = []
    word_row = 0
    for seg in weight.segments:
        ls = LayoutSegment(seg.bits, seg.col_start, seg.n_cols, word_row)
        layout_segments.append(ls)
        if seg.bits:
            word_row += ls.n_word_rows
            pad_bits.append(_pad_bits_of(qweight, seg, m))
    codes = torch.zeros(word_row, m, dtype=torch.int32, device=device)
    for ls, seg in zip(layout_segments, weight.segments, strict=True):
        if ls.bits:
            _realign_segment(qweight, seg, ls, m, codes)
    widths = sorted({s.bits for s in layout_segments if s.bits})
    max_zero, max_qz = grid_bounds(range_min, range_max, widths)
    return KernelLayout(
        device=device,
        codes=codes,
        colmap=perm,
        group_of=group_index,
        range_min=range_min,
        range_max=range_max,
        bits_header=bits_header,
        pad_bits=tuple(pad_bits),
        segments=tuple(layout_segments),
        out_features=m,
        in_features=n,
        max_abs_zero=max_zero,
        max_abs_qz=max_qz,
    )


def stored_qweight(layout: KernelLayout) -> torch.Tensor:
    """The stored ``qweight`` words, bit for bit (pad bits included), rebuilt from the layout's codes."""
    m = layout.out_features
    pads = iter(layout.pad_bits)
    parts = [_restore_segment(layout.codes, ls, m, next(pads)) for ls in layout.segments if ls.bits]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32, device=layout.device)


def stored_tensors(layout: KernelLayout) -> fmt.BaqWeight:
    """The exact inverse of :func:`build_layout`: the packed weight, on the layout's device."""
    tensors = {
        "weight": stored_qweight(layout),
        fmt.HEADER_TENSOR: layout.bits_header,
        "perm": layout.colmap,
        "range_min": layout.range_min,
        "range_max": layout.range_max,
        "group_index": layout.group_of,
    }
    return fmt.BaqWeight(layout.out_features, tensors)


# Layouts by the int key that torch.ops.baq_hf.linear receives (an op's arguments can only be tensors and
# scalars); held weakly, since each layer owns its layout.
LAYOUTS: weakref.WeakValueDictionary[int, KernelLayout] = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


def register_layout(layout: KernelLayout) -> KernelLayout:
    """Give ``layout`` a fresh op key under which ``torch.ops.baq_hf.linear`` finds it."""
    layout.op_key = next(_KEYS)
    LAYOUTS[layout.op_key] = layout
    return layout


# ----------------------------------------------------------------------------------------------
# repacking one segment (vectorized int64 bit arithmetic, chunked over output rows)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _segment_stream(qweight: torch.Tensor, seg: fmt.Segment, m: int) -> torch.Tensor:
    """The segment's stored words as uint32 values in int64, plus one 0 word to read past the end."""
    words = qweight[seg.word_start : seg.word_start + seg.n_words(m)].to(torch.int64) & _U32
    return torch.cat([words, words.new_zeros(1)])


def _pad_bits_of(qweight: torch.Tensor, seg: fmt.Segment, m: int) -> int:
    """The bits of the segment's last stored word above its last code (0 for streams packed by format)."""
    used = (m * seg.n_cols * seg.bits) % 32
    if used == 0 or m == 0:
        return 0
    last = int(qweight[seg.word_start + seg.n_words(m) - 1]) & _U32
    return last & ~((1 << used) - 1) & _U32


def _low_mask(n_bits: torch.Tensor) -> torch.Tensor:
    """(1 << n_bits) - 1 for n_bits in 0..32 (int64)."""
    return (torch.ones_like(n_bits) << n_bits) - 1


def _realign_segment(qweight: torch.Tensor, seg: fmt.Segment, ls: LayoutSegment, m: int, codes: torch.Tensor):
    """Write the segment's words into ``codes``: row i's stream, word-aligned, down word rows."""
    stream = _segment_stream(qweight, seg, m)
    row_bits = seg.n_cols * seg.bits
    n_u = ls.n_word_rows
    u = torch.arange(n_u, device=stream.device, dtype=torch.int64)
    keep = _low_mask((row_bits - 32 * u).clamp(max=32))  # the last word of a row stops at its last code
    rows_per_chunk = max(1, _WORDS_PER_CHUNK // max(n_u, 1))
    for i0 in range(0, m, rows_per_chunk):
        i = torch.arange(i0, min(m, i0 + rows_per_chunk), device=stream.device, dtype=torch.int64)
        bit = i[None, :] * row_bits + 32 * u[:, None]  # [n_u, rows]: first stream bit of each word
        lo = stream[bit >> 5]
        hi = stream[(bit >> 5) + 1]
        words = (((hi << 32) | lo) >> (bit & 31)) & keep[:, None]
        codes[ls.word_row : ls.word_row + n_u, i0 : i0 + i.numel()] = _to_int32(words)


def _restore_segment(codes: torch.Tensor, ls: LayoutSegment, m: int, pad_bits: int) -> torch.Tensor:
    """The segment's stored words from the layout: stored word t holds stream bits 32t .. 32t + 31,
    which come from the rows whose bit ranges [i * L, (i + 1) * L) overlap it (L = bits per row)."""
    row_bits = ls.n_cols * ls.bits
    n_words = fmt.words_for(m * row_bits)
    n_u = ls.n_word_rows
    # each row's words as uint32 in int64, [m, n_u + 1] (a 0 word to read past the row's end)
    rows = codes[ls.word_row : ls.word_row + n_u].t().to(torch.int64) & _U32
    rows = torch.cat([rows, rows.new_zeros(m, 1)], dim=1).reshape(-1)
    t = torch.arange(n_words, device=codes.device, dtype=torch.int64)
    first_row = (32 * t) // row_bits
    out = torch.zeros_like(t)
    for q in range(-(-32 // row_bits) + 1):  # rows overlapping one word: at most ceil(32 / L) + 1
        i = first_row + q
        start = i * row_bits  # the row's first stream bit
        valid = (i < m) & (start < 32 * t + 32)
        o = (32 * t - start).clamp(min=0)  # first bit taken from the row
        s = (start - 32 * t).clamp(min=0)  # where it lands in the word
        n_bits = torch.minimum(row_bits - o, 32 - s).clamp(min=0)
        base = i.clamp(max=m - 1) * (n_u + 1) + (o >> 5).clamp(max=n_u - 1)
        lo = rows[base]
        hi = rows[base + 1]
        piece = ((((hi << 32) | lo) >> (o & 31)) & _low_mask(n_bits)) << s
        out |= torch.where(valid, piece, 0) & _U32
    if n_words:
        out[-1] |= pad_bits
    return _to_int32(out)
