"""The CPU compute layout of a BaqLinear and its product: no bitstream is unpacked per call.

Built once from the stored tensors (plain torch ops, tensors in / tensors out). A stored column k with
R >= 1 bits in range group g has the grid ``s = D / L`` (``D = mx - mn`` of its row and group,
``L = 2^R - 1``) and ``w = s (q - z)``, z the zero of (row, group, R). With ``D`` (shared by all
bitwidths of a group) factored out, per output row m::

    y = sum_g D[m, g] * ( sum_{k in g, R_k >= 1} (x_k / L_k) (q_mk - off_k)  -  sum_R X[g, R] (z - off_R) )

``X[g, R]`` is the sum of ``x_k / L`` over the group's R-bit columns and ``off_R = 8 sum_i 16^i`` over
the column's nibbles (8, or 136 for 5-8 bits). Every term is a small integer times ``D[m, g]`` times an
input, so the whole layer is one weight-only int4 matrix with one scale per 32-column chunk (torch's
``_weight_int4pack_mm_for_cpu``, groups of 32, zero point 0). Its columns, group by group:

- nibble i of every column that has it, as its own column (input ``16^i x_k / L``): one column for
  R <= 4, two for 5-8 bits, up to four for the format's 15;
- per (group, bitwidth) pair, the balanced base-16 digits ``d_i`` (code ``d_i + 8``) of ``z - off``
  (as many as the largest |z - off| needs: one for R <= 4 when the range contains 0), with input
  ``-16^i X[g, R]``;
- code 8 (weight 0) up to a multiple of 32 columns.

0-bit columns drop out. Resident memory: 0.5 byte per int4 column (~0.6-0.8 byte per weight at 3 bits
with groups of 64) and bf16 scales ``D`` per chunk; no float weight is kept.

Products, chosen by measurement (docs/results/cpu_runtime.md):
- bf16 inputs, up to :data:`INT4_MAX_ROWS` rows: the int4 kernel, one call per layer (decode is
  memory-bound and it reads ~8x fewer bytes than an fp32 linear).
- more rows, and fp32 / fp16 inputs: the chunk weight ``D (q4 - 8)`` decoded from the int4 codes into a
  temporary (fp32 ``D`` from the stored fp16 ranges for fp32), then a matmul. torch's int4 kernel is
  vectorized only for bf16 and rounds ``D`` and its output to bf16, so fp32 inputs do not use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import format as fmt

CHUNK = 32  # columns per scale of the int4 kernel (its smallest group size)
ROW_BLOCK = 64  # torch's CPU int4 packing stores 64 output rows per block: rows are padded to a multiple
NIBBLE = 4  # an R-bit column becomes ceil(R / 4) int4 columns, nibble i scaled by 16^i
CENTER = 8  # the int4 kernel's code offset: code 8 is weight 0 (the padding code)
INT4_MAX_ROWS = 96  # bf16 inputs with more rows: decode + bf16 matmul (measured cross-over, ~110 rows)


@dataclass(eq=False)
class CpuLayout:
    """CPU tensors of one BaqLinear (see the module doc); ``packed`` is None when every column is 0-bit.

    The int4 matrix's input is ``[x, X] [:, gather] * col_scale``, X the pair sums of :func:`pair_sums`.
    """

    out_features: int
    in_features: int
    packed: torch.Tensor | None  # uint8 [rows, K4 / 2]: torch's int4 packing
    gather: torch.Tensor  # int64 [K4]: column of [x, X] that feeds each int4 column (pads: 0)
    col_scale: torch.Tensor  # fp32 [K4]: 1/L, 16/L, -16^i (pads: 0)
    chunk_group: torch.Tensor  # int64 [K4 / 32]: range group of each chunk
    scales: torch.Tensor  # bf16 [K4 / 32, rows, 2]: (D, 0) per chunk and row, the int4 kernel's input
    pair_cols: torch.Tensor  # int64 [n]: the nonzero-bit input columns
    pair_of: torch.Tensor  # int64 [n]: their (group, bitwidth) pair
    pair_inv_levels: torch.Tensor  # fp32 [n]: 1 / L
    n_pairs: int
    range_min: torch.Tensor  # the stored fp16 ranges, referenced (fp32 products derive D from them)
    range_max: torch.Tensor

    @property
    def rows(self) -> int:
        return self.scales.shape[1]

    def nbytes(self) -> int:
        """Bytes of the tensors this layout adds (the referenced stored ranges not counted)."""
        own = [self.gather, self.col_scale, self.chunk_group, self.scales, self.pair_cols, self.pair_of,
               self.pair_inv_levels] + ([self.packed] if self.packed is not None else [])  # fmt: skip
        return sum(t.numel() * t.element_size() for t in own)


def _nibbles(bits: int) -> int:
    return -(-bits // NIBBLE)


def _balanced_digits(u: torch.Tensor) -> list[torch.Tensor]:
    """Digits d_i in [-8, 7] with ``u = sum_i 16^i d_i`` (int64 ``u``), as few as every entry needs."""
    digits: list[torch.Tensor] = []
    while not digits or bool(u.any()):
        d = (u + CENTER) % 16 - CENTER
        digits.append(d)
        u = (u - d) // 16
    return digits


def build_cpu_layout(weight: fmt.BaqWeight) -> CpuLayout:
    """The CPU layout of a validated packed weight; its stored tensors are not modified."""
    perm, group_index = weight.perm.cpu(), weight.group_index
    range_min, range_max = weight.range_min.cpu(), weight.range_max.cpu()
    m, n = weight.out_features, weight.in_features
    bits = weight.stored_bits
    small = torch.uint8 if not bits.numel() or int(bits.max()) <= 8 else torch.int16  # small temporaries
    codes = fmt.unpack_codes(weight.qweight.cpu(), weight.segments, m, small)  # [m, n], stored order
    groups = group_index.long().cpu() if group_index is not None else torch.zeros(n, dtype=torch.long)
    rmin, rmax = range_min.cpu(), range_max.cpu()
    levels = ((1 << bits) - 1).float()
    nz = (bits > 0).nonzero().flatten()
    pair_key, pair_of = torch.unique(groups[nz] * (fmt.MAX_BITS + 1) + bits[nz], return_inverse=True)

    # int4 columns, group by group: codes [m, c], source column of [x, X], multiplier
    col_codes, sources, mults, chunk_group = [], [], [], []
    for g in torch.unique(groups[nz]).tolist():
        mine = nz[groups[nz] == g]
        n_cols = 0
        for i in range(_nibbles(int(bits[mine].max()))):  # nibble i of every column that has it
            have = mine[bits[mine] > NIBBLE * i]
            col_codes.append(((codes[:, have] >> (NIBBLE * i)) & 15).to(torch.uint8))
            sources.append(perm[have].long())
            mults.append(16.0**i / levels[have])
            n_cols += have.numel()
        for p in (pair_key // (fmt.MAX_BITS + 1) == g).nonzero().flatten().tolist():
            r = int(pair_key[p]) % (fmt.MAX_BITS + 1)
            _, zero = fmt.grid(rmin[:, g], rmax[:, g], r)
            offset = CENTER * sum(16**i for i in range(_nibbles(r)))
            for i, digit in enumerate(_balanced_digits(zero.long() - offset)):
                col_codes.append((digit + CENTER).to(torch.uint8).unsqueeze(1))
                sources.append(torch.tensor([n + p]))
                mults.append(torch.tensor([-(16.0**i)]))
                n_cols += 1
        pad = (-n_cols) % CHUNK
        col_codes.append(torch.full((m, pad), CENTER, dtype=torch.uint8))
        sources.append(torch.zeros(pad, dtype=torch.long))
        mults.append(torch.zeros(pad))
        chunk_group += [g] * ((n_cols + pad) // CHUNK)
    rows = -(-m // ROW_BLOCK) * ROW_BLOCK
    chunk_g = torch.tensor(chunk_group, dtype=torch.long)
    scales = torch.zeros(chunk_g.numel(), rows, 2)
    scales[:, :m, 0] = (rmax.float() - rmin.float())[:, chunk_g].t()
    packed = None
    if chunk_group:
        q4 = torch.full((rows, CHUNK * len(chunk_group)), CENTER, dtype=torch.int32)
        q4[:m] = torch.cat(col_codes, dim=1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    return CpuLayout(
        out_features=m,
        in_features=n,
        packed=packed,
        gather=torch.cat(sources) if sources else torch.zeros(0, dtype=torch.long),
        col_scale=torch.cat(mults) if mults else torch.zeros(0),
        chunk_group=chunk_g,
        scales=scales.to(torch.bfloat16),
        pair_cols=perm[nz].long().cpu(),
        pair_of=pair_of,
        pair_inv_levels=1.0 / levels[nz],
        n_pairs=pair_key.numel(),
        range_min=range_min,
        range_max=range_max,
    )


def int4_input(x: torch.Tensor, layout: CpuLayout) -> torch.Tensor:
    """The int4 matrix's input [rows, K4] for ``x`` [rows, in_features]: data columns and pair sums.

    The pair sums X (sum of x_k / L over each (group, bitwidth) pair) are formed in fp32.
    """
    xf = x.float()
    xs = xf.index_select(1, layout.pair_cols) * layout.pair_inv_levels
    pairs = xf.new_zeros(x.shape[0], layout.n_pairs).index_add_(1, layout.pair_of, xs)
    ext = torch.cat([xf, pairs], dim=1)
    return (ext.index_select(1, layout.gather) * layout.col_scale).to(x.dtype)


def _decoded_weight(layout: CpuLayout, dtype: torch.dtype) -> torch.Tensor:
    """The int4 matrix's weight ``D (q4 - 8)`` [K4, rows] in ``dtype``, decoded into a temporary.

    torch's CPU packing keeps row ``64 b + 32 h + j``, column k in nibble h of byte ``[b, k, j]``, so the
    transposed weight ``[k, (b, h, j)]`` decodes from runs of 32 contiguous bytes. ``D`` is fp32 from the
    stored fp16 ranges for fp32, else the bf16 scales.
    """
    k4, n_chunks = layout.gather.numel(), layout.chunk_group.numel()
    if dtype == torch.float32:
        d = torch.zeros(n_chunks, layout.rows)
        span = layout.range_max.float() - layout.range_min.float()
        d[:, : layout.out_features] = span[:, layout.chunk_group].t()
    else:
        d = layout.scales[:, :, 0].to(dtype)
    p = layout.packed.view(layout.rows // ROW_BLOCK, k4, CHUNK).transpose(0, 1)  # [k4, blocks, 32]
    w = torch.stack((p & 15, p >> 4), dim=2).to(dtype).sub_(CENTER)  # [k4, blocks, 2, 32]
    w.view(n_chunks, CHUNK, layout.rows).mul_(d.unsqueeze(1))
    return w.view(k4, layout.rows)


def _decoded_product(v: torch.Tensor, layout: CpuLayout) -> torch.Tensor:
    """``v @ (D (q4 - 8))^T`` [batch, rows] in v's dtype (see :func:`_decoded_weight`)."""
    return torch.mm(v, _decoded_weight(layout, v.dtype))


def int4_input_backward(grad_v: torch.Tensor, layout: CpuLayout) -> torch.Tensor:
    """The transpose of :func:`int4_input` (a linear map of x): the gradient [rows, in_features], fp32."""
    n = layout.in_features
    gv = grad_v.float() * layout.col_scale
    ext = gv.new_zeros(gv.shape[0], n + layout.n_pairs).index_add_(1, layout.gather, gv)
    from_pairs = ext[:, n:].index_select(1, layout.pair_of) * layout.pair_inv_levels
    return ext[:, :n].index_add_(1, layout.pair_cols, from_pairs)


class _CpuLinear(torch.autograd.Function):
    """:func:`cpu_linear` with a backward to x (and the bias): ``grad @ W``, W decoded from the layout.

    The int4 kernel has no autograd; the backward runs the forward's own product transposed (decoded
    int4 weight, then the transpose of :func:`int4_input`), so nothing of W is kept between the passes
    and the packed tensors get no gradient.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, layout: CpuLayout, bias: torch.Tensor | None, compute: torch.dtype
    ) -> torch.Tensor:
        ctx.layout, ctx.x_shape, ctx.x_dtype, ctx.compute = layout, x.shape, x.dtype, compute
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _cpu_product(x, layout, bias, compute)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layout = ctx.layout
        m, n = layout.out_features, layout.in_features
        compute = ctx.compute  # the forward's product dtype
        g2 = grad.reshape(-1, m).to(compute)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            if layout.packed is None:
                gx = g2.new_zeros(g2.shape[0], n)
            else:
                gx = int4_input_backward(g2 @ _decoded_weight(layout, compute)[:, :m].t(), layout)
            grad_x = gx.to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, m).float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


def cpu_linear(
    x: torch.Tensor,
    layout: CpuLayout,
    bias: torch.Tensor | None = None,
    compute: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ W^T + bias`` for CPU ``x`` of any leading shape, W the layer's dequantized weight.

    ``compute`` (bf16 or fp32) overrides the dtype the product is computed in; None: bf16 for bf16
    ``x``, else fp32. The result has x's dtype. bf16 for fp32 ``x`` is the fast opt-in of
    :func:`baq_hf.linear.set_cpu_compute_dtype` (bf16 accuracy below).

    Accuracy against the reference ``x @ format.dequantize_weight(...)^T`` (tests/test_cpu_runtime.py):
    - fp32 (fp16 computes in fp32): the same products regrouped. Per weight ``(D/L)(q - z) x`` becomes
      integer terms ``|q4 - 8| <= 8`` and ``|z - off|`` (digits of at most 8, times 16 for split
      columns) times ``D`` and ``x/L``, each at most ~``2 max(D, |w|) |x|``, so each term costs a few
      fp32 roundings of that: the error is a small multiple of ``eps_fp32 sum_k |x_k| max(D_k, |w_k|)``
      (|w| exceeds D only when a range excludes 0).
    - bf16: ``x / L``, the pair sums, ``D`` and the output are rounded to bf16 (2^-9 relative each), as
      in a bf16 ``F.linear``: the error is a small multiple of ``2^-9 sum_k |x_k| max(D_k, |w_k|)``.

    Differentiable in x and the bias when they need a gradient (:class:`_CpuLinear`), e.g. for LoRA.
    """
    if compute is None:
        compute = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    elif compute not in (torch.bfloat16, torch.float32):
        raise ValueError(f"CPU compute dtype {compute} is not supported: use torch.bfloat16 or torch.float32")
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _CpuLinear.apply(x, layout, bias, compute)
    return _cpu_product(x, layout, bias, compute)


def _cpu_product(
    x: torch.Tensor, layout: CpuLayout, bias: torch.Tensor | None, compute: torch.dtype
) -> torch.Tensor:
    """:func:`cpu_linear` without autograd, in the ``compute`` dtype."""
    shape = x.shape
    x2 = x.reshape(-1, layout.in_features).to(compute)
    m = layout.out_features
    if layout.packed is None:
        y = x2.new_zeros(x2.shape[0], m)
    else:
        v = int4_input(x2, layout)
        if compute == torch.bfloat16 and x2.shape[0] <= INT4_MAX_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(v, layout.packed, CHUNK, layout.scales)[:, :m]
        else:
            y = _decoded_product(v, layout)[:, :m]  # fp32, or bf16 with many rows
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype).reshape(*shape[:-1], m)
