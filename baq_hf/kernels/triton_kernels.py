"""Triton kernels over the kernel layout (:mod:`baq_hf.kernels.layout`): tensors in, tensors out.

This module imports triton at import time; :mod:`baq_hf.kernels` imports it lazily, so that machines
without triton (or without a GPU) can use the rest of the package.

- ``_gemv_kernel`` (one row of x, per-row ranges): programs over (row tile, K tile). A K tile is up to
  ``BLOCK_K / 32`` runs of 32 columns of one bitwidth R, walked by a runtime loop; a run of an output
  row is R whole words, loaded as ``[BLOCK_N]`` int32 vectors (16-byte loads, 4 output rows per load).
  The 32 codes of a run are decoded by a loop unrolled at compile time for each bitwidth the layer has
  (constant shifts and masks; only the codes that straddle two words read the next word), and each
  code's x is one scalar load through the column map. The row's zero point is folded into the
  int -> float conversion: ``(2^23 + q) - (2^23 + zero)`` is ``q - zero`` exactly when ``|zero| < 2^22``
  (checked when the layout is built), and the scale multiplies the tile's sum.
- ``_tile_kernel`` (1-16 rows, or grouped ranges): the same tiles decoded as ``[BLOCK_K, BLOCK_N]``
  codes with per-column shifts (R is a runtime value here), fed to ``tl.dot`` for more than one row.
  With per-row ranges the dot takes ``q - zero`` (exact in fp16 / bf16 when the layout's bound says so)
  and the scale multiplies the product; otherwise the weights ``scale * (q - zero)`` rounded to the
  activation dtype, as the torch path's ``W.to(dtype)`` does.
- ``_dequant_kernel``: the dense weight, exactly as :func:`baq_hf.format.dequantize_weight` computes it,
  written through strides (``W`` or ``W^T``).

The row count and the number of K tiles are not specialized on (``do_not_specialize``), so that every
layer of a model with the same dtypes, bitwidth range and config shares one compiled kernel.

One launch per product: every program adds its fp32 partial sums into a persistent workspace with
atomics; the last program of a row tile (a per-row-tile counter says which) reads the sums back while
zeroing them, adds the bias and writes y in the output dtype, then resets the counter. So a call
allocates only y and launches one kernel; the workspace is all zeros between calls. The kernels of one
device share one workspace, so they must not run concurrently on several streams.

Exactness: codes become floats exactly (``float(2^23 | q) - 2^23``); the grid is evaluated with the fp32
operations of :func:`baq_hf.format.grid`, with correctly rounded divisions (``tl.math.div_rn``).
Outputs in bf16 are rounded to nearest-even by hand and stored through an int16 view, because the
Triton interpreter (used by the CPU tests) truncates fp32 -> bf16 casts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .layout import TILE_FIELDS, KernelLayout

FIELDS = tl.constexpr(TILE_FIELDS)
MAX_TILE_ROWS = 16  # the most rows of x the fused kernels take (BLOCK_B of the dot)


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
def _grid(mn, mx, levels):
    """format.grid in fp32: scale = (mx - mn) / levels, zero = floor(-mn / scale + 1/2)."""
    scale = tl.math.div_rn(mx - mn, levels)
    zero = tl.floor(tl.math.div_rn(-mn, scale) + 0.5)
    return scale, zero


@triton.jit
def _tile_fields(tile_ptr, pid_k):
    t = tile_ptr + pid_k * FIELDS
    return tl.load(t), tl.load(t + 1), tl.load(t + 2), tl.load(t + 3), tl.load(t + 4)


@triton.jit
def _finish(
    part, wptrs, optrs, bptrs, mask, counter, n_tiles, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr
):
    """Add ``part`` into the workspace at ``wptrs``; the row tile's last program (``counter`` counts
    them) writes y at ``optrs`` (+ the bias at ``bptrs``, broadcast) and re-zeroes the workspace.

    The barrier makes every thread's atomic add happen before the counter's release; the program that
    sees the count reach ``n_tiles - 1`` acquired all of them and reads the sums with atomic exchanges
    (coherent in L2, and they leave zeros behind).
    """
    tl.atomic_add(wptrs, part, mask=mask, sem="relaxed")
    tl.debug_barrier()
    done = tl.atomic_add(counter, 1, sem="acq_rel")
    if done == n_tiles - 1:
        # exchanged as int32 bit patterns: the same on a GPU, and what the interpreter supports
        zeros = tl.zeros_like(part).to(tl.int32)
        ibits = tl.atomic_xchg(wptrs.to(tl.pointer_type(tl.int32)), zeros, mask=mask, sem="relaxed")
        total = tl.where(mask, ibits.to(tl.float32, bitcast=True), 0.0)  # masked lanes return garbage
        if HAS_BIAS:
            total += tl.load(bptrs, mask=mask, other=0.0).to(tl.float32)
        _store_out(optrs, total, mask, OUT_BF16)
        tl.atomic_xchg(counter, 0, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# batch-1 GEMV, per-row ranges


@triton.jit
def _run_word(q_ptr, row, wrow_end, offs_n, nmask, M):
    """Word row ``row`` of the codes for the tile's output rows: ``[BLOCK_N]`` uint32 (16-byte loads)."""
    ptrs = q_ptr + row.to(tl.int64) * M + offs_n
    in_segment = (offs_n * 0 + row) < wrow_end  # a block: the interpreter rejects scalar masks on blocks
    return tl.load(ptrs, mask=nmask & in_segment, other=0).to(tl.uint32, bitcast=True)


@triton.jit
def _gemv_tile(
    q_ptr,
    x_ptr,
    colmap_ptr,
    mn,
    mx,
    offs_n,
    nmask,
    M,
    kcol0,
    ncols,
    wrow0,
    wrow_end,
    R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """sum over the tile's columns k of W[n, k] x[k] for R-bit codes: ``[BLOCK_N]`` fp32.

    A runtime loop over the tile's runs; within a run, the 32 codes are decoded by a loop unrolled at
    compile time (constant shifts and masks; only codes that straddle two words read the next one),
    and each code's x is one scalar load through the column map, broadcast to every thread.
    """
    scale, zero = _grid(mn, mx, tl.full([BLOCK_N], (1 << R) - 1, tl.float32))
    zero_f = zero + 8388608.0  # 2^23 + zero, exact for |zero| < 2^22
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for run in range(0, tl.cdiv(ncols, 32)):
        row0 = wrow0 + run * R
        cur = _run_word(q_ptr, row0, wrow_end, offs_n, nmask, M)
        for w in tl.static_range(R):
            if w + 1 < R:
                nxt = _run_word(q_ptr, row0 + w + 1, wrow_end, offs_n, nmask, M)
            # the codes that start in word w
            for c in tl.static_range((32 * w + R - 1) // R, (32 * w + 32 + R - 1) // R):
                if c * R - 32 * w + R <= 32:
                    code = cur >> (c * R - 32 * w)
                else:  # straddles into word w + 1
                    code = (cur >> (c * R - 32 * w)) | (nxt << (32 * w + 32 - c * R))
                qz = ((code & ((1 << R) - 1)) | 0x4B000000).to(tl.float32, bitcast=True) - zero_f
                k = run * 32 + c
                col = tl.load(colmap_ptr + kcol0 + k, mask=k < ncols, other=0)
                acc += qz * tl.load(x_ptr + col, mask=k < ncols, other=0.0).to(tl.float32)
            if w + 1 < R:
                cur = nxt
    return acc * scale


@triton.jit(do_not_specialize=["n_tiles"])
def _gemv_kernel(
    x_ptr,
    out_ptr,
    q_ptr,
    colmap_ptr,
    rmin_ptr,
    rmax_ptr,
    bias_ptr,
    tile_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    n_tiles,
    WIDTHS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y = W x + b for one row x: this program's (row tile, K tile) share, then :func:`_finish`."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < M
    bits, kcol0, ncols, wrow0, wrow_end = _tile_fields(tile_ptr, pid_k)
    # masked rows get a harmless [-1, 1] range so that no NaN is ever formed
    mn = tl.load(rmin_ptr + offs_n, mask=nmask, other=-1.0).to(tl.float32)
    mx = tl.load(rmax_ptr + offs_n, mask=nmask, other=1.0).to(tl.float32)
    part = tl.zeros([BLOCK_N], dtype=tl.float32)
    for R in tl.static_range(1, 16):
        if (WIDTHS >> R) & 1:  # noqa: SIM102 (compile-time test; the inner one is a runtime branch)
            if bits == R:
                part += _gemv_tile(q_ptr, x_ptr, colmap_ptr, mn, mx, offs_n, nmask, M, kcol0, ncols, wrow0,
                                   wrow_end, R, BLOCK_N)  # fmt: skip
    _finish(part, ws_ptr + offs_n, out_ptr + offs_n, bias_ptr + offs_n, nmask, cnt_ptr + pid_n, n_tiles,
            HAS_BIAS, OUT_BF16)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# tiles of codes with per-column shifts: skinny GEMM and the dequantizer


@triton.jit
def _decode_tile(q_ptr, bits, wrow0, offs_k, kmask, offs_n, nmask, M):
    """Codes ``[BLOCK_K, BLOCK_N]`` (fp32, exact) of a tile's columns (``bits`` may be 0: all zero)."""
    bit = offs_k * bits
    sh = bit & 31
    rows = (wrow0 + (bit >> 5)).to(tl.int64)
    ptrs = q_ptr + rows[:, None] * M + offs_n[None, :]
    has_bits = kmask & (offs_k * 0 + bits > 0)  # a block, not a scalar (as in _run_word)
    lo = tl.load(ptrs, mask=has_bits[:, None] & nmask[None, :], other=0).to(tl.uint32, bitcast=True)
    straddle = has_bits & (sh + bits > 32)
    hi = tl.load(ptrs + M, mask=straddle[:, None] & nmask[None, :], other=0).to(tl.uint32, bitcast=True)
    shu = sh.to(tl.uint32)[:, None]
    code = ((lo >> shu) | ((hi << 1) << (31 - shu))) & ((1 << bits) - 1).to(tl.uint32)
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _tile_grid(group_ptr, rmin_ptr, rmax_ptr, bits, kcol0, offs_k, kmask, offs_n, nmask, G,
               GROUPED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """(scale, zero) of a tile's codes: ``[BLOCK_K, BLOCK_N]`` per range group, or ``[1, BLOCK_N]`` per
    row. Masked entries get a harmless [-1, 1] range; 0-bit tiles a grid of 1 level (their weights
    are zeroed by the caller)."""
    levels = tl.maximum((1 << bits) - 1, 1).to(tl.float32)
    if GROUPED:
        g = tl.load(group_ptr + kcol0 + offs_k, mask=kmask, other=0)
        roff = offs_n[None, :] * G + g[:, None]
        m2 = kmask[:, None] & nmask[None, :]
        mn = tl.load(rmin_ptr + roff, mask=m2, other=-1.0).to(tl.float32)
        mx = tl.load(rmax_ptr + roff, mask=m2, other=1.0).to(tl.float32)
        scale, zero = _grid(mn, mx, tl.zeros([BLOCK_K, BLOCK_N], tl.float32) + levels)
    else:  # one return for both branches: Triton types every return of a function, constexpr or not
        mn = tl.load(rmin_ptr + offs_n, mask=nmask, other=-1.0).to(tl.float32)
        mx = tl.load(rmax_ptr + offs_n, mask=nmask, other=1.0).to(tl.float32)
        row_scale, row_zero = _grid(mn, mx, tl.zeros([BLOCK_N], tl.float32) + levels)
        scale = row_scale[None, :]
        zero = row_zero[None, :]
    return scale, zero


@triton.jit(do_not_specialize=["B", "n_tiles"])
def _tile_kernel(
    x_ptr,
    out_ptr,
    q_ptr,
    colmap_ptr,
    group_ptr,
    rmin_ptr,
    rmax_ptr,
    bias_ptr,
    tile_ptr,
    ws_ptr,
    cnt_ptr,
    B,
    M,
    G,
    stride_xb,
    stride_ob,
    n_tiles,
    GROUPED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_BF16: tl.constexpr,
    FACTOR_SCALE: tl.constexpr,
    W_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Y = X W^T + b for B <= BLOCK_B rows of X: this program's (row tile, K tile) share."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < M
    bits, kcol0, ncols, wrow0, _ = _tile_fields(tile_ptr, pid_k)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < ncols
    q = _decode_tile(q_ptr, bits, wrow0, offs_k, kmask, offs_n, nmask, M)
    scale, zero = _tile_grid(group_ptr, rmin_ptr, rmax_ptr, bits, kcol0, offs_k, kmask, offs_n, nmask, G,
                             GROUPED, BLOCK_K, BLOCK_N)  # fmt: skip
    if FACTOR_SCALE:  # noqa: SIM108 (a constexpr branch)
        w = q - zero  # integers, exact in W_DTYPE (the layout's bound was checked)
    else:
        w = scale * (q - zero)
    col = tl.load(colmap_ptr + kcol0 + offs_k, mask=kmask, other=0)
    if BLOCK_B == 1:
        xv = tl.load(x_ptr + col, mask=kmask, other=0.0).to(tl.float32)
        part = tl.sum(w * xv[:, None], axis=0)
        if FACTOR_SCALE:
            part = part * tl.reshape(scale, [BLOCK_N])
        _finish(part, ws_ptr + offs_n, out_ptr + offs_n, bias_ptr + offs_n, nmask, cnt_ptr + pid_n, n_tiles,
                HAS_BIAS, OUT_BF16)  # fmt: skip
    else:
        rows = tl.arange(0, BLOCK_B)[:, None]
        xt = tl.load(x_ptr + rows * stride_xb + col[None, :], mask=(rows < B) & kmask[None, :], other=0.0)
        part = tl.dot(xt.to(W_DTYPE), w.to(W_DTYPE), input_precision=PRECISION)
        if FACTOR_SCALE:
            part = part * scale
        cols = offs_n[None, :]
        _finish(part, ws_ptr + rows * M + cols, out_ptr + rows * stride_ob + cols, bias_ptr + 0 * rows + cols,
                (rows < B) & nmask[None, :], cnt_ptr + pid_n, n_tiles, HAS_BIAS, OUT_BF16)  # fmt: skip


@triton.jit
def _dequant_kernel(
    out_ptr,
    q_ptr,
    colmap_ptr,
    group_ptr,
    rmin_ptr,
    rmax_ptr,
    tile_ptr,
    M,
    G,
    stride_oc,
    stride_on,
    GROUPED: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``BLOCK_K x BLOCK_N`` tile of W, written to ``out[colmap[k] * stride_oc + n * stride_on]``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < M
    bits, kcol0, ncols, wrow0, _ = _tile_fields(tile_ptr, pid_k)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < ncols
    m2 = kmask[:, None] & nmask[None, :]
    q = _decode_tile(q_ptr, bits, wrow0, offs_k, kmask, offs_n, nmask, M)
    scale, zero = _tile_grid(group_ptr, rmin_ptr, rmax_ptr, bits, kcol0, offs_k, kmask, offs_n, nmask, G,
                             GROUPED, BLOCK_K, BLOCK_N)  # fmt: skip
    w = scale * (q - zero)
    w = tl.where((offs_k * 0 + bits > 0)[:, None], w, 0.0)
    col = tl.load(colmap_ptr + kcol0 + offs_k, mask=kmask, other=0).to(tl.int64)
    _store_out(out_ptr + col[:, None] * stride_oc + offs_n[None, :] * stride_on, w, m2, OUT_BF16)


# ----------------------------------------------------------------------------------------------
# launchers (tensors in, tensors out)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


class Workspace:
    """Per-device fp32 partial sums (``MAX_TILE_ROWS x M``) and per-row-tile counters, all zero between
    calls. It only grows; a grown-out buffer is kept alive, because a captured CUDA graph may use it."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._retired: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, device: torch.device, m: int, n_row_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        ws = self._by_device.get(device)
        if ws is None or ws[0].numel() < MAX_TILE_ROWS * m or ws[1].numel() < n_row_tiles:
            if ws is not None:
                self._retired.append(ws)
                m = max(m, ws[0].numel() // MAX_TILE_ROWS)
                n_row_tiles = max(n_row_tiles, ws[1].numel())
            ws = (
                torch.zeros(MAX_TILE_ROWS * m, dtype=torch.float32, device=device),
                torch.zeros(n_row_tiles, dtype=torch.int32, device=device),
            )
            self._by_device[device] = ws
        return ws


WORKSPACE = Workspace()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_x(x2: torch.Tensor, layout: KernelLayout) -> None:
    if x2.dtype not in DTYPES:
        raise TypeError(f"BAQ kernels support fp16, bf16 and fp32 activations, not {x2.dtype}")
    if x2.dim() != 2 or x2.shape[1] != layout.in_features:
        raise ValueError(f"x must be (rows, {layout.in_features}), got {tuple(x2.shape)}")
    if x2.device != layout.device:
        raise RuntimeError(f"the BAQ kernel layout is on {layout.device} but the input is on {x2.device}")


class _Launch(NamedTuple):
    """What the two products launch with: y, the kernel's view of it, tiles, workspace and grid."""

    y: torch.Tensor
    out: torch.Tensor  # y, or its int16 view for bf16 (see _store_out)
    tiles: torch.Tensor
    n_tiles: int
    ws: torch.Tensor
    cnt: torch.Tensor
    grid: tuple[int, int]


def _prepare(x2: torch.Tensor, layout: KernelLayout, bias: torch.Tensor | None, block_n: int,
             block_k: int) -> _Launch | torch.Tensor:  # fmt: skip
    """Checks, y and the launch arguments of a product; y itself when no kernel is needed (no rows,
    or only 0-bit columns: y = b)."""
    _check_x(x2, layout)
    m = layout.out_features
    y = torch.empty(x2.shape[0], m, dtype=x2.dtype, device=x2.device)
    tiles, n_tiles = layout.tile_table(block_k)
    if x2.shape[0] == 0 or n_tiles == 0:
        return y.copy_(bias.expand_as(y)) if bias is not None else y.zero_()
    grid = (_cdiv(m, block_n), n_tiles)
    ws, cnt = WORKSPACE.get(x2.device, m, grid[0])
    out = y.view(torch.int16) if y.dtype == torch.bfloat16 else y
    return _Launch(y, out, tiles, n_tiles, ws, cnt, grid)


def gemv(
    x2: torch.Tensor,
    layout: KernelLayout,
    bias: torch.Tensor | None,
    *,
    block_n: int,
    block_k: int,
    num_warps: int,
) -> torch.Tensor:
    """y = x2 W^T + b for one row (1 x N, contiguous), per-row ranges, with :func:`_gemv_kernel`."""
    if x2.shape[0] != 1 or layout.grouped or not layout.zero_fold_exact:
        raise ValueError("gemv takes one row of x and a per-row layout whose zero points fold exactly")
    p = _prepare(x2, layout, bias, block_n, block_k)
    if not isinstance(p, _Launch):
        return p
    _gemv_kernel[p.grid](
        x2, p.out, layout.codes, layout.colmap, layout.range_min, layout.range_max,
        bias if bias is not None else p.ws, p.tiles, p.ws, p.cnt, layout.out_features, p.n_tiles,
        WIDTHS=layout.widths, HAS_BIAS=bias is not None, OUT_BF16=p.y.dtype == torch.bfloat16,
        BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return p.y


def tile_matmul(
    x2: torch.Tensor,
    layout: KernelLayout,
    bias: torch.Tensor | None,
    *,
    block_n: int,
    block_k: int,
    num_warps: int,
) -> torch.Tensor:
    """Y = X W^T + b for up to 16 rows of X (rows contiguous), with :func:`_tile_kernel`."""
    b = x2.shape[0]
    if b > MAX_TILE_ROWS:
        raise ValueError(f"tile_matmul takes at most {MAX_TILE_ROWS} rows, got {b}")
    p = _prepare(x2, layout, bias, block_n, block_k)
    if not isinstance(p, _Launch):
        return p
    # the dot's operand dtype: the activations', except under the interpreter (CPU tensors), which
    # cannot run bf16 dots: there fp32 (exact products, so only more precise)
    w_dtype = torch.float32 if x2.dtype == torch.bfloat16 and x2.device.type == "cpu" else x2.dtype
    # per-row ranges: the dot takes the exact integers q - zero and the scale multiplies the product
    factor = not layout.grouped and layout.qz_exact_in(w_dtype)
    precision = "ieee" if w_dtype == torch.float32 else "tf32"
    _tile_kernel[p.grid](
        x2, p.out, layout.codes, layout.colmap, layout.group_of if layout.grouped else layout.colmap,
        layout.range_min, layout.range_max, bias if bias is not None else p.ws, p.tiles, p.ws, p.cnt, b,
        layout.out_features, layout.n_groups, x2.stride(0), p.y.stride(0), p.n_tiles,
        GROUPED=layout.grouped, HAS_BIAS=bias is not None, OUT_BF16=p.y.dtype == torch.bfloat16,
        FACTOR_SCALE=factor, W_DTYPE=_TL_DTYPE[w_dtype], PRECISION=precision,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_B=1 if b == 1 else MAX_TILE_ROWS, num_warps=num_warps,
    )  # fmt: skip
    return p.y


def dequantize(
    layout: KernelLayout,
    dtype: torch.dtype,
    *,
    transposed: bool = False,
    block_n: int = 64,
    block_k: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """The dense weight W (M x N, original column order) in ``dtype``, or W^T (N x M, contiguous).

    Equals ``format.dequantize_weight(...).to(dtype)`` bit for bit.
    """
    if dtype not in DTYPES:
        raise TypeError(f"BAQ kernels write fp16, bf16 or fp32 weights, not {dtype}")
    m, n = layout.out_features, layout.in_features
    out = torch.empty((n, m) if transposed else (m, n), dtype=dtype, device=layout.device)
    tiles, n_tiles = layout.tile_table(block_k, with_zero_bits=True)
    if m == 0 or n_tiles == 0:
        return out
    stride_oc, stride_on = (m, 1) if transposed else (1, n)
    out_bf16 = dtype == torch.bfloat16
    _dequant_kernel[(_cdiv(m, block_n), n_tiles)](
        out.view(torch.int16) if out_bf16 else out,
        layout.codes if layout.codes.numel() else layout.colmap,
        layout.colmap,
        layout.group_of if layout.grouped else layout.colmap,
        layout.range_min,
        layout.range_max,
        tiles,
        m,
        layout.n_groups,
        stride_oc,
        stride_on,
        GROUPED=layout.grouped,
        OUT_BF16=out_bf16,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out
