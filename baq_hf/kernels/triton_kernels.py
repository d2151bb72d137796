"""Triton kernels for BaqLinear: fused mixed-bit GEMVs / skinny GEMM and an exact dequantizer.

This module imports triton at import time; :mod:`baq_hf.kernels` imports it lazily, so that machines
without triton (or without a GPU) can use the rest of the package.

All kernels read the BAQ storage format of :mod:`baq_hf.format` directly: for every bitwidth segment
(stored columns ``col_start .. col_start + n_cols``) code (i, k) sits at bit ``(i * n_cols + k) * R``
of a little-endian int32 bitstream that starts at word ``word_start``; a code may straddle two words.

- ``_baq_gemv_chunked_kernel`` (batch 1): decodes 32-code runs from whole words.
- ``_baq_gemv_kernel`` (1-16 rows): extracts each code on its own, tensor-core dot for > 1 row.
- ``_baq_dequant_kernel``: the dense weight, in original or storage column order.

Exactness: the grid is evaluated with exactly the fp32 operations of :func:`baq_hf.format.grid`, with
correctly rounded divisions (``tl.math.div_rn``; Triton's ``/`` on fp32 is an approximate division on
NVIDIA GPUs) and ``floor(x + 0.5)``, so every dequantized weight equals the torch reference bit for
bit. Products with x accumulate in fp32; only the multi-row dot rounds weights first (to fp16 for
fp16 activations, as the torch path's ``W.to(fp16)`` does; tf32 for bf16).

Activations and ranges are widened to fp32 on load. Outputs in bf16 are rounded to nearest-even by
hand and stored through an int16 view, because the Triton interpreter (used by the CPU tests)
truncates fp32 -> bf16 casts and cannot run bf16 dots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .. import format as fmt

# segment table row: col_start, n_cols, word_start, block_offset, word_end (host and kernel views)
_N_SEG_FIELDS = 5
SEG_FIELDS = tl.constexpr(_N_SEG_FIELDS)


@triton.jit
def _round_bf16_bits(v):
    """fp32 -> bf16 bit pattern (int32 holding 16 bits), round to nearest even like torch."""
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(v != v, 0x7FC0, r)  # canonical NaN, as c10::BFloat16 does
    return r.to(tl.int32, bitcast=True)


@triton.jit
def _store_out(ptrs, v, mask, OUT_BF16: tl.constexpr):
    """Store fp32 ``v`` converted to the output's dtype (bf16 outputs are int16 views)."""
    if OUT_BF16:
        tl.store(ptrs, _round_bf16_bits(v).to(tl.int16), mask=mask)
    else:
        tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _code_to_float(code):
    """Exact float of a uint32 code < 2^23: the float 2^23 + code, minus 2^23 (2 cheap ops, no I2F)."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _funnel(lo, hi, s):
    """Bits s .. s + 31 of the 64-bit word hi:lo (uint32; s < 32, so no shift by 32)."""
    return (lo >> s) | ((hi << 1) << (31 - s))


@triton.jit
def _grid(mn, mx, levels):
    """format.grid in fp32: scale = (mx - mn) / levels, zero = floor(-mn / scale + 1/2)."""
    scale = tl.math.div_rn(mx - mn, levels)
    zero = tl.floor(tl.math.div_rn(-mn, scale) + 0.5)
    return scale, zero


@triton.jit
def _baq_gemv_kernel(
    x_ptr,
    out_ptr,
    q_ptr,
    perm_ptr,
    rmin_ptr,
    rmax_ptr,
    gidx_ptr,
    bias_ptr,
    seg_ptr,
    B,
    M,
    G,
    stride_xb,
    stride_ob,
    SPLIT,
    MAX_R: tl.constexpr,
    GROUPED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    OUT_BF16: tl.constexpr,
    DOT_FP16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """out[b, rows] (+)= x[b] . W[rows]^T for one block of output rows and one K split.

    ``seg_ptr`` is an int32 table indexed by bitwidth R: (col_start, n_cols, word_start, block_offset,
    word_end); absent widths have n_cols = 0. The loop over R is unrolled at compile time (R is a
    constexpr), so shifts and masks are constants and widths 1, 2, 4, 8, which never straddle a word,
    read one word.
    Column blocks of all segments are numbered globally (block_offset) and dealt round-robin to the
    SPLIT programs of a row block, so split-K stays balanced even when segments are short.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    if BLOCK_B == 1:
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        offs_b = tl.arange(0, BLOCK_B)
        bmask = offs_b < B
        acc = tl.zeros([BLOCK_M, BLOCK_B], dtype=tl.float32)
    if not GROUPED:
        # masked rows get a harmless [-1, 1] range so that no NaN is ever formed
        mn_row = tl.load(rmin_ptr + rows, mask=rmask, other=-1.0).to(tl.float32)
        mx_row = tl.load(rmax_ptr + rows, mask=rmask, other=1.0).to(tl.float32)

    for R in tl.static_range(1, MAX_R + 1):
        col_start = tl.load(seg_ptr + R * SEG_FIELDS + 0)
        n_cols = tl.load(seg_ptr + R * SEG_FIELDS + 1)
        word_start = tl.load(seg_ptr + R * SEG_FIELDS + 2)
        blk_off = tl.load(seg_ptr + R * SEG_FIELDS + 3)
        levels = tl.full([BLOCK_M], (1 << R) - 1, tl.float32)
        if not GROUPED:
            scale_row, zero_row = _grid(mn_row, mx_row, levels)
        # bit position of each row's first code, split into a word and an in-word shift (int32 below)
        row_bit = word_start.to(tl.int64) * 32 + rows64 * (n_cols * R).to(tl.int64)
        row_word = row_bit >> 5
        row_sh = (row_bit & 31).to(tl.int32)
        n_blocks = tl.cdiv(n_cols, BLOCK_K)
        first = ((pid_k - blk_off) % SPLIT + SPLIT) % SPLIT
        for kb in range(first, n_blocks, SPLIT):
            k = kb * BLOCK_K + offs_k
            kmask = k < n_cols
            m2 = rmask[:, None] & kmask[None, :]
            t = row_sh[:, None] + (k * R)[None, :]
            word = row_word[:, None] + (t >> 5)
            sh = (t & 31).to(tl.uint32)
            code = tl.load(q_ptr + word, mask=m2, other=0).to(tl.uint32, bitcast=True) >> sh
            if (R & (R - 1)) != 0:
                straddle = m2 & ((t & 31) + R > 32)
                hi = tl.load(q_ptr + word + 1, mask=straddle, other=0).to(tl.uint32, bitcast=True)
                code = code | ((hi << 1) << (31 - sh))
            q = _code_to_float(code & ((1 << R) - 1))
            cols = col_start + k
            if GROUPED:
                g = tl.load(gidx_ptr + cols, mask=kmask, other=0)
                roff = rows[:, None] * G + g[None, :]
                mn = tl.load(rmin_ptr + roff, mask=m2, other=-1.0).to(tl.float32)
                mx = tl.load(rmax_ptr + roff, mask=m2, other=1.0).to(tl.float32)
                scale, zero = _grid(mn, mx, tl.full([BLOCK_M, BLOCK_K], (1 << R) - 1, tl.float32))
                w = scale * (q - zero)
            else:
                w = scale_row[:, None] * (q - zero_row[:, None])
            # x gathered through perm; masked columns read 0, so their (finite) weights add nothing
            orig = tl.load(perm_ptr + cols, mask=kmask, other=0)
            if BLOCK_B == 1:
                xv = tl.load(x_ptr + orig, mask=kmask, other=0.0).to(tl.float32)
                acc += tl.sum(w * xv[None, :], axis=1)
            else:
                xt = tl.load(
                    x_ptr + offs_b[None, :] * stride_xb + orig[:, None],
                    mask=kmask[:, None] & bmask[None, :],
                    other=0.0,
                )
                if DOT_FP16:
                    # fp16 tensor cores; w rounded to fp16 exactly as the torch path's W.to(fp16)
                    acc = tl.dot(w.to(tl.float16), xt, acc)
                else:
                    # bf16 (tf32 tensor cores, finer than bf16) or fp32 (ieee) activations
                    acc = tl.dot(w, xt.to(tl.float32), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        if ATOMIC:
            bias = tl.where(pid_k == 0, bias, 0.0)
        if BLOCK_B == 1:
            acc += bias
        else:
            acc += bias[:, None]
    if BLOCK_B == 1:
        optrs = out_ptr + rows
        omask = rmask
    else:
        optrs = out_ptr + offs_b[None, :] * stride_ob + rows[:, None]
        omask = rmask[:, None] & bmask[None, :]
    if ATOMIC:
        tl.atomic_add(optrs, acc, mask=omask)
    else:
        _store_out(optrs, acc, omask, OUT_BF16)


@triton.jit
def _chunked_segment(
    x_ptr,
    q_ptr,
    perm_ptr,
    rmin_ptr,
    rmax_ptr,
    gidx_ptr,
    seg_ptr,
    rows,
    rmask,
    mn_row,
    mx_row,
    G,
    SPLIT,
    pid_k,
    R: tl.constexpr,
    P: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    """Contribution of the R-bit segment to W[rows] . x, for one K split (see the kernel below).

    P is a power of two >= ceil(32 / R): the most codes that start in one aligned word.
    """
    offs_c = tl.arange(0, CHUNKS)
    offs_p = tl.arange(0, P)
    col_start = tl.load(seg_ptr + R * SEG_FIELDS + 0)
    n_cols = tl.load(seg_ptr + R * SEG_FIELDS + 1)
    word_start = tl.load(seg_ptr + R * SEG_FIELDS + 2)
    blk_off = tl.load(seg_ptr + R * SEG_FIELDS + 3)
    word_end = tl.load(seg_ptr + R * SEG_FIELDS + 4).to(tl.int64)
    if not GROUPED:
        scale_row, zero_row = _grid(mn_row, mx_row, tl.full([BLOCK_M], (1 << R) - 1, tl.float32))
        scale_b = scale_row[:, None, None]
        zero_b = zero_row[:, None, None]
    row_bit = word_start.to(tl.int64) * 32 + rows.to(tl.int64) * (n_cols * R).to(tl.int64)
    row_word = row_bit >> 5
    s = (row_bit & 31).to(tl.uint32)[:, None]
    n_blocks = tl.cdiv(n_cols, 32 * CHUNKS)
    first = ((pid_k - blk_off) % SPLIT + SPLIT) % SPLIT
    acc = tl.zeros([BLOCK_M, CHUNKS, P], dtype=tl.float32)
    for kb in range(first, n_blocks, SPLIT):
        chunk = kb * CHUNKS + offs_c
        col0 = chunk * 32  # first column of each run, within the segment
        m2 = rmask[:, None] & (col0 < n_cols)[None, :]
        base = row_word[:, None] + (chunk * R).to(tl.int64)[None, :]
        # raw words base .. base + R; those past the segment's end are masked to 0
        raw = tl.load(q_ptr + base, mask=m2 & (base < word_end), other=0).to(tl.uint32, bitcast=True)
        raw_nx = tl.load(q_ptr + base + 1, mask=m2 & (base + 1 < word_end), other=0)
        raw_nx = raw_nx.to(tl.uint32, bitcast=True)
        cur = _funnel(raw, raw_nx, s)  # aligned word 0
        raw = raw_nx
        for w in tl.static_range(R):
            j0 = (32 * w + R - 1) // R  # first code starting in aligned word w
            n_w = (32 * (w + 1) + R - 1) // R - j0  # how many start there (<= P)
            j = j0 + offs_p
            lane = offs_p < n_w
            sh = tl.where(lane, j * R - 32 * w, 0).to(tl.uint32)
            code = cur[:, :, None] >> sh[None, None, :]
            if w + 1 < R:
                raw_nx = tl.load(q_ptr + base + w + 2, mask=m2 & (base + w + 2 < word_end), other=0)
                raw_nx = raw_nx.to(tl.uint32, bitcast=True)
                nxt = _funnel(raw, raw_nx, s)
                raw = raw_nx
                if (32 % R) != 0:  # the last code of word w runs into word w + 1: bring its bits in
                    code = code | ((nxt << 1)[:, :, None] << (31 - sh)[None, None, :])
                cur = nxt
            q = _code_to_float(code & ((1 << R) - 1))
            colj = col0[:, None] + j[None, :]  # [CHUNKS, P], within the segment
            cmask = (colj < n_cols) & lane[None, :]
            cols = col_start + colj
            if GROUPED:
                g = tl.load(gidx_ptr + cols, mask=cmask, other=0)
                roff = rows[:, None, None] * G + g[None, :, :]
                rm3 = rmask[:, None, None] & cmask[None, :, :]
                mn = tl.load(rmin_ptr + roff, mask=rm3, other=-1.0).to(tl.float32)
                mx = tl.load(rmax_ptr + roff, mask=rm3, other=1.0).to(tl.float32)
                scale, zero = _grid(mn, mx, tl.full([BLOCK_M, CHUNKS, P], (1 << R) - 1, tl.float32))
                wt = scale * (q - zero)
            else:
                wt = scale_b * (q - zero_b)
            # lanes past the run and columns past the segment (bits of the next row, or masked
            # words) meet x = 0, and their weights are finite
            orig = tl.load(perm_ptr + cols, mask=cmask, other=0)
            xv = tl.load(x_ptr + orig, mask=cmask, other=0.0).to(tl.float32)
            acc += wt * xv[None, :, :]
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _baq_gemv_chunked_kernel(
    x_ptr,
    out_ptr,
    q_ptr,
    perm_ptr,
    rmin_ptr,
    rmax_ptr,
    gidx_ptr,
    bias_ptr,
    seg_ptr,
    M,
    G,
    SPLIT,
    MAX_R: tl.constexpr,
    GROUPED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    """Batch-1 GEMV that decodes whole words: out[rows] (+)= W[rows] . x for one row block and K split.

    A row's R-bit codes are one contiguous bit range, so 32 consecutive codes of a row span exactly R
    words, starting at the row's bit offset s. Each element of a [BLOCK_M, CHUNKS] tile is such a run
    of 32 columns: its R + 1 words are loaded once and funnel-shifted by s into R aligned words. Then,
    for each aligned word w (a loop unrolled at compile time, like the loop over R), the codes that
    start in w are extracted along a third axis of P lanes with per-lane shifts, a code running into
    word w + 1 taking its high bits from there. A code thus costs a few shifts and a mask instead of
    its own bit-offset arithmetic and loads, and the kernel's size grows with sum(R), not 32 x sum(R)
    (a fully unrolled version took minutes to compile). Weights are formed exactly as format.grid /
    dequantize_codes do; products accumulate in fp32. Same segment table and split-K scheme as
    :func:`_baq_gemv_kernel`, blocks of 32 * CHUNKS columns.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    mn_row = tl.load(rmin_ptr + rows, mask=rmask & (not GROUPED), other=-1.0).to(tl.float32)
    mx_row = tl.load(rmax_ptr + rows, mask=rmask & (not GROUPED), other=1.0).to(tl.float32)
    args = (x_ptr, q_ptr, perm_ptr, rmin_ptr, rmax_ptr, gidx_ptr, seg_ptr, rows, rmask, mn_row, mx_row, G)
    y = tl.zeros([BLOCK_M], dtype=tl.float32)
    for R in tl.static_range(1, MAX_R + 1):
        # P = a power of two >= ceil(32 / R), as a literal (shapes must be compile-time constants)
        if R == 1:
            y += _chunked_segment(*args, SPLIT, pid_k, R, 32, GROUPED, BLOCK_M, CHUNKS)
        elif R <= 3:
            y += _chunked_segment(*args, SPLIT, pid_k, R, 16, GROUPED, BLOCK_M, CHUNKS)
        elif R <= 7:
            y += _chunked_segment(*args, SPLIT, pid_k, R, 8, GROUPED, BLOCK_M, CHUNKS)
        else:
            y += _chunked_segment(*args, SPLIT, pid_k, R, 4, GROUPED, BLOCK_M, CHUNKS)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        if ATOMIC:
            bias = tl.where(pid_k == 0, bias, 0.0)
        y += bias
    if ATOMIC:
        tl.atomic_add(out_ptr + rows, y, mask=rmask)
    else:
        _store_out(out_ptr + rows, y, rmask, OUT_BF16)


@triton.jit
def _baq_dequant_kernel(
    out_ptr,
    q_ptr,
    perm_ptr,
    rmin_ptr,
    rmax_ptr,
    gidx_ptr,
    tile_ptr,
    M,
    G,
    stride_om,
    GROUPED: tl.constexpr,
    STORED_ORDER: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Write one BLOCK_M x BLOCK_K tile of the dense weight.

    ``tile_ptr`` holds one int32 row per column tile: (bits, tile_col_start, seg_col_start, seg_n_cols,
    word_start). The bitwidth is a runtime value here (one launch covers all segments, 0-bit ones
    included, which write zeros). Columns go to ``perm[col]`` (original order) or stay in storage order.
    """
    pid_t = tl.program_id(0)
    pid_m = tl.program_id(1)
    R = tl.load(tile_ptr + pid_t * 5 + 0)
    tile_col = tl.load(tile_ptr + pid_t * 5 + 1)
    col_start = tl.load(tile_ptr + pid_t * 5 + 2)
    n_cols = tl.load(tile_ptr + pid_t * 5 + 3)
    word_start = tl.load(tile_ptr + pid_t * 5 + 4)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    k = tile_col - col_start + tl.arange(0, BLOCK_K)
    kmask = k < n_cols
    m2 = rmask[:, None] & kmask[None, :]
    cols = col_start + k

    row_bit = word_start.to(tl.int64) * 32 + rows64 * (n_cols * R).to(tl.int64)
    t = (row_bit & 31).to(tl.int32)[:, None] + (k * R)[None, :]
    word = (row_bit >> 5)[:, None] + (t >> 5)
    sh = (t & 31).to(tl.uint32)
    has_bits = (k * 0 + R) > 0  # a block, not a scalar: the interpreter rejects scalar-broadcast masks
    code = tl.load(q_ptr + word, mask=m2 & has_bits[None, :], other=0).to(tl.uint32, bitcast=True) >> sh
    hi = tl.load(q_ptr + word + 1, mask=m2 & ((t & 31) + R > 32), other=0).to(tl.uint32, bitcast=True)
    code = code | ((hi << 1) << (31 - sh))
    maxq = (1 << R) - 1
    q = _code_to_float(code & maxq.to(tl.uint32))
    levels = tl.maximum(maxq, 1).to(tl.float32)

    if GROUPED:
        g = tl.load(gidx_ptr + cols, mask=kmask, other=0)
        roff = rows[:, None] * G + g[None, :]
        mn = tl.load(rmin_ptr + roff, mask=m2, other=-1.0).to(tl.float32)
        mx = tl.load(rmax_ptr + roff, mask=m2, other=1.0).to(tl.float32)
        scale, zero = _grid(mn, mx, tl.zeros([BLOCK_M, BLOCK_K], tl.float32) + levels)
        w = scale * (q - zero)
    else:
        mn = tl.load(rmin_ptr + rows, mask=rmask, other=-1.0).to(tl.float32)
        mx = tl.load(rmax_ptr + rows, mask=rmask, other=1.0).to(tl.float32)
        scale, zero = _grid(mn, mx, tl.zeros([BLOCK_M], tl.float32) + levels)
        w = scale[:, None] * (q - zero[:, None])
    w = tl.where(has_bits[None, :], w, 0.0)

    if STORED_ORDER:  # noqa: SIM108 (a constexpr branch)
        dst = cols
    else:
        dst = tl.load(perm_ptr + cols, mask=kmask, other=0)
    _store_out(out_ptr + rows64[:, None] * stride_om + dst[None, :], w, m2, OUT_BF16)


# ----------------------------------------------------------------------------------------------
# launchers

FUSED_MAX_ROWS = 16  # the most rows the fused kernels take (BLOCK_B)
_TILE_FIELDS = 5
_N_SM: dict[int, int] = {}


@dataclass
class KernelMeta:
    """Per-layer launch metadata, built once per (device, packed data) so decode rebuilds nothing."""

    device: torch.device
    n_rows: int
    qweight_ptr: int
    segments: tuple[fmt.Segment, ...]
    segments_list: list[fmt.Segment]  # the layer's own list: an identity check on the decode path
    max_bits: int
    seg_tables: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    tile_tables: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)

    def seg_table(self, block_k: int) -> tuple[torch.Tensor, int]:
        """int32 (MAX_BITS + 1) x 5 table indexed by bitwidth, and the number of column blocks."""
        if block_k not in self.seg_tables:
            table = torch.zeros(fmt.MAX_BITS + 1, _N_SEG_FIELDS, dtype=torch.int32)
            n_blocks = 0
            for s in self.segments:
                if s.bits == 0:
                    continue
                word_end = s.word_start + s.n_words(self.n_rows)
                table[s.bits] = torch.tensor([s.col_start, s.n_cols, s.word_start, n_blocks, word_end])
                n_blocks += _cdiv(s.n_cols, block_k)
            self.seg_tables[block_k] = (table.to(self.device), n_blocks)
        return self.seg_tables[block_k]

    def tile_table(self, block_k: int) -> tuple[torch.Tensor, int]:
        """int32 n_tiles x 5 table of the dequantizer's column tiles (0-bit segments included)."""
        if block_k not in self.tile_tables:
            rows = [
                [s.bits, c0, s.col_start, s.n_cols, s.word_start]
                for s in self.segments
                for c0 in range(s.col_start, s.col_start + s.n_cols, block_k)
            ]
            table = torch.tensor(rows, dtype=torch.int32).reshape(-1, _TILE_FIELDS)
            self.tile_tables[block_k] = (table.to(self.device), len(rows))
        return self.tile_tables[block_k]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def layer_meta(layer) -> KernelMeta:
    """The cached :class:`KernelMeta` of ``layer``; rebuilt when its device or packed data change."""
    meta: KernelMeta | None = getattr(layer, "_baq_kernel_meta", None)
    q = layer.qweight
    segs = layer.segments
    if (
        meta is not None
        and meta.device == q.device
        and meta.qweight_ptr == q.data_ptr()
        and (meta.segments_list is segs or meta.segments == tuple(segs))
    ):
        return meta
    segs_t = tuple(segs)
    meta = KernelMeta(
        device=q.device,
        n_rows=layer.out_features,
        qweight_ptr=q.data_ptr(),
        segments=segs_t,
        segments_list=segs,
        max_bits=max((s.bits for s in segs_t), default=0),
    )
    layer._baq_kernel_meta = meta
    return meta


def _n_sm(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # interpreter: programs run one after another, more of them only cost time
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _N_SM:
        _N_SM[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _N_SM[idx]


def _check_layer(layer, device: torch.device) -> None:
    if layer.qweight.device != device:
        raise RuntimeError(f"BaqLinear tensors are on {layer.qweight.device} but the input is on {device}")


def fused_linear(
    x2: torch.Tensor,
    layer,
    *,
    impl: str = "auto",
    block_m: int | None = None,
    block_k: int | None = None,
    split: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """y = x2 W^T + b (B x M, x2's dtype) with a fused kernel, for B <= 16 rows of x2 (B x N).

    ``impl``: "chunked" (word-level decode, batch 1 only), "per_code" (each code read on its own,
    tensor-core dot for B > 1), or "auto" (chunked for B = 1). ``block_k`` is the number of columns
    per step (32 x a power of two for chunked); block sizes and warps default to untuned guesses.
    ``split`` > 1 splits K over that many programs per row block (fp32 atomics, then a cast); by
    default it is chosen so that small layers still fill the GPU.
    """
    n_rows, n = x2.shape
    if n_rows > FUSED_MAX_ROWS:
        raise ValueError(f"fused_linear takes at most {FUSED_MAX_ROWS} rows, got {n_rows}")
    if n != layer.in_features:
        raise ValueError(f"input has {n} features, layer expects {layer.in_features}")
    dtype = x2.dtype
    if dtype not in _DTYPES:
        raise TypeError(f"BAQ kernels support fp16, bf16 and fp32 activations, not {dtype}")
    _check_layer(layer, x2.device)
    if impl == "auto":
        impl = "chunked" if n_rows == 1 else "per_code"
    if impl not in ("chunked", "per_code") or (impl == "chunked" and n_rows > 1):
        raise ValueError(f"impl={impl!r} for {n_rows} rows: use 'per_code', or 'chunked' for one row")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = layer.out_features
    meta = layer_meta(layer)
    if n_rows == 0:
        return x2.new_empty(0, m)
    block_b = 1 if n_rows == 1 else 16
    if block_m is None:
        block_m = 16 if block_b == 1 else 32
    if block_k is None:
        block_k = 256 if impl == "chunked" else 128 if block_b == 1 else 64
    if num_warps is None:
        # spill-free on sm_90 per ptxas at MAX_R = 8 (168-229 registers); not yet tuned on a GPU
        num_warps = 8 if block_b > 1 else 4
    if impl == "chunked" and (block_k % 32 or (block_k // 32) & (block_k // 32 - 1)):
        raise ValueError(f"chunked block_k must be 32 x a power of two, got {block_k}")
    seg_table, n_blocks = meta.seg_table(block_k)
    n_row_blocks = _cdiv(m, block_m)
    if split is None:
        split = max(1, min((2 * _n_sm(x2.device)) // n_row_blocks, n_blocks))
    split = max(1, split)
    atomic = split > 1
    if atomic:
        out = torch.zeros(n_rows, m, dtype=torch.float32, device=x2.device)
    else:
        out = torch.empty(n_rows, m, dtype=dtype, device=x2.device)
    out_bf16 = out.dtype == torch.bfloat16
    bias = layer.bias
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)  # the torch path rounds the bias to the activation dtype too
    grouped = layer.group_index is not None
    common = (
        out.view(torch.int16) if out_bf16 else out,
        layer.qweight if layer.qweight.numel() else layer.perm,  # never read when empty
        layer.perm,
        layer.range_min,
        layer.range_max,
        layer.group_index if grouped else layer.perm,
        bias if bias is not None else layer.perm,
        seg_table,
    )
    flags = dict(
        MAX_R=meta.max_bits, GROUPED=grouped, HAS_BIAS=bias is not None, ATOMIC=atomic, OUT_BF16=out_bf16
    )
    grid = (n_row_blocks, split)
    if impl == "chunked":
        _baq_gemv_chunked_kernel[grid](
            x2,
            *common,
            m,
            layer.range_min.shape[1],
            split,
            **flags,
            BLOCK_M=block_m,
            CHUNKS=block_k // 32,
            num_warps=num_warps,
        )
    else:
        _baq_gemv_kernel[grid](
            x2,
            *common,
            n_rows,
            m,
            layer.range_min.shape[1],
            x2.stride(0),
            out.stride(0),
            split,
            **flags,
            DOT_FP16=dtype == torch.float16,
            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            BLOCK_B=block_b,
            num_warps=num_warps,
        )
    return out.to(dtype) if atomic and dtype != torch.float32 else out


def dequantize(
    layer,
    dtype: torch.dtype = torch.float16,
    *,
    stored_order: bool = False,
    block_m: int = 32,
    block_k: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """Dense weight (M x N) in ``dtype``; equals ``layer.dequantize().to(dtype)`` bit for bit.

    With ``stored_order`` the columns stay in storage order (coalesced stores), for callers that
    permute x instead (``x[:, perm] @ W_stored^T``).
    """
    if dtype not in _DTYPES:
        raise TypeError(f"BAQ kernels write fp16, bf16 or fp32 weights, not {dtype}")
    m, n = layer.out_features, layer.in_features
    device = layer.qweight.device
    out = torch.empty(m, n, dtype=dtype, device=device)
    if m == 0 or n == 0:
        return out
    meta = layer_meta(layer)
    tiles, n_tiles = meta.tile_table(block_k)
    grouped = layer.group_index is not None
    out_bf16 = dtype == torch.bfloat16
    _baq_dequant_kernel[(n_tiles, _cdiv(m, block_m))](
        out.view(torch.int16) if out_bf16 else out,
        layer.qweight if layer.qweight.numel() else layer.perm,
        layer.perm,
        layer.range_min,
        layer.range_max,
        layer.group_index if grouped else layer.perm,
        tiles,
        m,
        layer.range_min.shape[1],
        out.stride(0),
        GROUPED=grouped,
        STORED_ORDER=stored_order,
        OUT_BF16=out_bf16,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
