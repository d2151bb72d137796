"""The BaqLinear storage format: quantization grids, dense bit packing and exact dequantization.

One quantized weight W (M out x N in) is stored as:

- ``perm`` (int32, N): stored column k holds original input column ``perm[k]``. Columns are sorted by
  bitwidth (stable), so equal-bitwidth columns are contiguous "segments" (as in EXL2).
- ``bits_header`` (uint8, ceil(N/2)): the 4-bit bitwidth of every stored column, low nibble first.
- ``range_min`` / ``range_max`` (fp16, M x G): the quantization range of each row (G = 1) or of each
  row and group of ``group_size`` columns (G = N / group_size).
- ``group_index`` (int32, N, only when grouped): the range group of every stored column.
- ``qweight`` (int32, n_words): the codes. For each bitwidth R >= 1 present, in increasing order, the
  M x n_R codes of that segment form one dense little-endian bitstream in row-major order (code (i, k)
  at bit ``(i * n_R + k) * R``); each segment starts at a 32-bit word boundary. 0-bit columns store
  nothing and dequantize to 0.

The grid of a row (or group) with range [mn, mx] at R bits is GPTQ's asymmetric grid, derived from the
fp16 range in fp32: ``scale = (mx - mn) / (2^R - 1)``, ``zero = floor(-mn / scale + 1/2)``, and a code q
dequantizes to ``scale * (q - zero)``. The quantizer and every dequantization path (torch, Triton)
evaluate exactly these fp32 operations, so a reloaded checkpoint reproduces GPTQ's weights bit for bit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

HEADER_BITS = 4
MAX_BITS = 2**HEADER_BITS - 1

# Codes unpacked per chunk on CPU, to bound the int64 temporaries of large layers.
_UNPACK_CHUNK = 1 << 22


def grid(range_min: torch.Tensor, range_max: torch.Tensor, bits: torch.Tensor | int):
    """Return (scale, zero) in fp32 for the given fp16-representable ranges and bitwidth(s).

    ``bits`` broadcasts against the ranges. For 0 bits scale and zero are 0 (the column is dropped).
    """
    mn = range_min.float()
    mx = range_max.float()
    bits_t = torch.as_tensor(bits, device=mn.device)
    levels = (torch.ones_like(bits_t, dtype=torch.int64) << bits_t.long()) - 1
    levels_f = levels.float().clamp(min=1.0)
    scale = (mx - mn) / levels_f
    zero = torch.floor(-mn / scale + 0.5)
    dropped = bits_t == 0
    scale = torch.where(dropped, torch.zeros_like(scale), scale)
    zero = torch.where(dropped, torch.zeros_like(zero), zero)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's rounding of ``w`` onto the grid: integer codes in [0, 2^bits - 1] (float tensor)."""
    if bits == 0:
        return torch.zeros_like(w)
    maxq = float((1 << bits) - 1)
    return torch.clamp(torch.round(w / scale) + zero, 0.0, maxq)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Exact dequantization ``scale * (q - zero)`` in fp32."""
    return scale * (codes.float() - zero)


def fit_range(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's per-row range of ``w`` (rows x cols), forced to include 0, rounded to fp16.

    Returns fp16 (min, max) with max > min guaranteed, which makes every grid well defined.
    """
    w = w.float()
    mn = torch.clamp(w.min(dim=1).values, max=0.0)
    mx = torch.clamp(w.max(dim=1).values, min=0.0)
    if sym:
        mx = torch.maximum(mn.abs(), mx)
        mn = -mx
    too_large = max(mx.abs().max().item(), mn.abs().max().item()) if w.numel() else 0.0
    if too_large > torch.finfo(torch.float16).max:
        raise ValueError(
            f"weight magnitude {too_large:.3g} exceeds the fp16 range used to store quantization ranges; "
            "rescale the layer or keep it unquantized with modules_to_not_convert"
        )
    mn16, mx16 = mn.half(), mx.half()
    degenerate = mx16 <= mn16
    mn16 = torch.where(degenerate, torch.full_like(mn16, -1.0), mn16)
    mx16 = torch.where(degenerate, torch.full_like(mx16, 1.0), mx16)
    return mn16, mx16


# ----------------------------------------------------------------------------------------------
# headers and segments


def pack_header(bits: torch.Tensor) -> torch.Tensor:
    """Pack per-column bitwidths (0..15) into uint8 nibbles, low nibble first."""
    b = bits.to(torch.uint8).cpu()
    if b.numel() % 2:
        b = torch.cat([b, torch.zeros(1, dtype=torch.uint8)])
    pairs = b.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_header(header: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_header`: int64 bitwidths of the ``n_cols`` stored columns."""
    h = header.to(torch.int64)
    bits = torch.stack([h & 0xF, h >> 4], dim=1).reshape(-1)
    return bits[:n_cols]


@dataclass(frozen=True)
class Segment:
    """A run of stored columns sharing one bitwidth, and where its codes start in ``qweight``."""

    bits: int
    col_start: int
    n_cols: int
    word_start: int

    def n_words(self, n_rows: int) -> int:
        return words_for(n_rows * self.n_cols * self.bits)


def words_for(n_bits: int) -> int:
    return (n_bits + 31) // 32


def segments_from_bits(stored_bits: torch.Tensor, n_rows: int) -> list[Segment]:
    """Segments of a sorted per-column bitwidth vector; raises if the columns are not sorted."""
    bits = stored_bits.tolist()
    if any(b2 < b1 for b1, b2 in itertools.pairwise(bits)):
        raise ValueError("stored column bitwidths must be sorted in increasing order")
    segments: list[Segment] = []
    word = 0
    start = 0
    while start < len(bits):
        b = bits[start]
        end = start
        while end < len(bits) and bits[end] == b:
            end += 1
        seg = Segment(bits=b, col_start=start, n_cols=end - start, word_start=word)
        word += seg.n_words(n_rows)
        segments.append(seg)
        start = end
    return segments


def total_words(segments: list[Segment], n_rows: int) -> int:
    return sum(s.n_words(n_rows) for s in segments)


# ----------------------------------------------------------------------------------------------
# dense bit packing


def _pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat tensor of codes (< 2^bits) into a little-endian bitstream of int32 words."""
    c = codes.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((c.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 32
    if pad:
        stream = torch.cat([stream, torch.zeros(pad, dtype=torch.int64)])
    words = (stream.view(-1, 32) << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    # reinterpret as signed int32 (two's complement) without overflow
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def pack_codes(stored_codes: torch.Tensor, stored_bits: torch.Tensor) -> torch.Tensor:
    """Pack M x N codes (columns already in storage order, bits sorted) into ``qweight``."""
    n_rows = stored_codes.shape[0]
    parts = []
    for seg in segments_from_bits(stored_bits, n_rows):
        if seg.bits == 0:
            continue
        block = stored_codes[:, seg.col_start : seg.col_start + seg.n_cols].cpu()
        if block.numel() and int(block.max()) >= (1 << seg.bits):
            raise ValueError(f"a code does not fit in {seg.bits} bits")
        parts.append(_pack_stream(block, seg.bits))
    if not parts:
        return torch.zeros(0, dtype=torch.int32)
    return torch.cat(parts)


def unpack_segment(qweight: torch.Tensor, seg: Segment, n_rows: int) -> torch.Tensor:
    """Codes (int64, M x n_cols) of one segment, read from the dense bitstream."""
    if seg.bits == 0:
        return torch.zeros(n_rows, seg.n_cols, dtype=torch.int64, device=qweight.device)
    words = qweight[seg.word_start : seg.word_start + seg.n_words(n_rows)].to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, words.new_zeros(1)])  # a code may straddle into the next word
    n = n_rows * seg.n_cols
    mask = (1 << seg.bits) - 1
    out = torch.empty(n, dtype=torch.int64, device=qweight.device)
    for start in range(0, n, _UNPACK_CHUNK):
        idx = torch.arange(start, min(n, start + _UNPACK_CHUNK), device=qweight.device, dtype=torch.int64)
        bit = idx * seg.bits
        lo = words[bit >> 5]
        hi = words[(bit >> 5) + 1]
        out[start : start + idx.numel()] = (((hi << 32) | lo) >> (bit & 31)) & mask
    return out.view(n_rows, seg.n_cols)


def unpack_codes(qweight: torch.Tensor, segments: list[Segment], n_rows: int) -> torch.Tensor:
    """All codes (int64, M x N) in storage order."""
    return torch.cat([unpack_segment(qweight, s, n_rows) for s in segments], dim=1)


def dequantize_weight(
    qweight: torch.Tensor,
    stored_bits: torch.Tensor,
    perm: torch.Tensor,
    range_min: torch.Tensor,
    range_max: torch.Tensor,
    group_index: torch.Tensor | None,
    n_rows: int,
) -> torch.Tensor:
    """The torch reference dequantization: fp32 weight (M x N) in the original column order."""
    segments = segments_from_bits(stored_bits, n_rows)
    codes = unpack_codes(qweight, segments, n_rows)
    gi = group_index.long() if group_index is not None else torch.zeros_like(perm, dtype=torch.long)
    mn = range_min[:, gi]  # M x N, per stored column
    mx = range_max[:, gi]
    scale, zero = grid(mn, mx, stored_bits.to(mn.device).unsqueeze(0))
    w_stored = dequantize_codes(codes, scale, zero)
    w = torch.empty_like(w_stored)
    w[:, perm.long()] = w_stored
    return w
