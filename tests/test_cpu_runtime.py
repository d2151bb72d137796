"""The CPU layout (baq_hf.kernels.cpu) multiplies like the reference dequantized weight.

Reference: ``x @ format.dequantize_weight(...)^T`` in float64 (x rounded to bf16 first for bf16 inputs).
Tolerances, in units of ``S = |x| @ max(D, |W|)^T`` (D = mx - mn of each weight's row and group),
from cpu_linear's docstring: each weight's product is regrouped into a few integer-times-``D x / L``
terms of at most ~``2 max(D, |w|) |x|`` (|w| > D only for ranges that exclude 0), so fp32 costs a few
fp32 roundings of S (2^-18 = 32 eps_fp32 leaves room for the sum order), and bf16 a few bf16 roundings
(inputs ``x / L``, pair sums, ``D``, output: 2^-6 = 8 x 2^-9).
"""

import pytest
import torch

from baq_hf import format as fmt
from baq_hf.kernels.cpu import INT4_MAX_ROWS, build_cpu_layout, cpu_linear

TOL = {torch.float32: 2.0**-18, torch.bfloat16: 2.0**-6}


def packed_layer(m: int, n: int, group_size: int, bits: list[int], seed: int, zero_in_range: bool = True):
    """A packed layer with the given per-column bitwidths (original order) and random codes and ranges."""
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == -1 else n // group_size
    group_of = None if group_size == -1 else (torch.arange(n) // group_size)[torch.randperm(n, generator=g)]
    if zero_in_range:
        mn, mx = -torch.rand(m, n_groups, generator=g) - 0.05, torch.rand(m, n_groups, generator=g) + 0.05
    else:  # a range that excludes 0: zero points far outside [0, 2^R - 1] (more base-16 digits)
        mn = torch.rand(m, n_groups, generator=g) + 0.5
        mx = mn + 0.01 + torch.rand(m, n_groups, generator=g)
    b = torch.tensor(bits)
    codes = torch.stack([torch.randint(0, 1 << int(r), (m,), generator=g) for r in b], dim=1)
    return fmt.BaqWeight.pack(codes, b, mn, mx, group_of)


def weight_and_bound(p: fmt.BaqWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """W and ``max(D, |W|)`` per weight (fp64), what the CPU product's error scales with."""
    m, n = p.out_features, p.in_features
    w = p.dequantize().double()
    gi = p.group_index.long() if p.group_index is not None else torch.zeros(n, dtype=torch.long)
    d = torch.empty(m, n, dtype=torch.float64)
    d[:, p.perm.long()] = (p.range_max.double() - p.range_min.double())[:, gi]
    return w, torch.maximum(d, w.abs())


def reference_and_scale(p: fmt.BaqWeight, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w, bound = weight_and_bound(p)
    xd = x.double().reshape(-1, p.in_features)
    return xd @ w.t(), xd.abs() @ bound.t()


def check(p: fmt.BaqWeight, rows: int, dtype: torch.dtype, seed: int, bias: bool = False) -> None:
    m, n = p.out_features, p.in_features
    layout = build_cpu_layout(p)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g).to(dtype)
    b = torch.randn(m, generator=g) if bias else None
    y = cpu_linear(x, layout, b)
    assert y.dtype == dtype and y.shape == (rows, m)
    ref, scale = reference_and_scale(p, x)
    if b is not None:
        ref = ref + b.to(dtype).double()
        scale = scale + b.double().abs()
    err = (y.double() - ref).abs()
    assert bool((err <= TOL[dtype] * scale + 1e-30).all()), float((err / scale.clamp(min=1e-30)).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", range(9))
def test_every_bitwidth_alone(r, dtype):
    check(packed_layer(70, 96, 32, [r] * 96, seed=r), rows=3, dtype=dtype, seed=r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("m", "n", "group_size", "top"),
    [(37, 50, -1, 8), (130, 96, 32, 8), (64, 192, 64, 8), (5, 3, 1, 8), (1, 1, -1, 8), (48, 64, 16, 15)],
)
def test_mixed_bitwidths_odd_shapes(m, n, group_size, top, dtype):
    g = torch.Generator().manual_seed(m * n)
    bits = torch.randint(0, top + 1, (n,), generator=g).tolist()
    p = packed_layer(m, n, group_size, bits, seed=m + n)
    check(p, rows=1, dtype=dtype, seed=1)
    check(p, rows=7, dtype=dtype, seed=2, bias=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranges_without_zero_and_many_rows(dtype):
    """Zero points outside the code range need several digits; > INT4_MAX_ROWS rows take the decode path."""
    bits = [1, 2, 3, 4, 5, 6, 7, 8] * 8
    p = packed_layer(96, 64, 32, bits, seed=3, zero_in_range=False)
    check(p, rows=2, dtype=dtype, seed=4)
    check(p, rows=INT4_MAX_ROWS + 5, dtype=dtype, seed=5)


def test_all_zero_bits_and_leading_shape():
    p = packed_layer(20, 12, -1, [0] * 12, seed=6)
    layout = build_cpu_layout(p)
    bias = torch.randn(20)
    y = cpu_linear(torch.randn(2, 3, 12), layout, bias)
    assert y.shape == (2, 3, 20) and torch.equal(y, bias.expand(2, 3, 20))
    q = packed_layer(64, 32, -1, [3] * 32, seed=7)
    layout = build_cpu_layout(q)
    x = torch.randn(2, 3, 32)
    assert torch.equal(cpu_linear(x, layout), cpu_linear(x.reshape(6, 32), layout).reshape(2, 3, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("bits", "rows", "zero_in_range"),
    [
        ([1, 2, 3, 4, 5, 6, 7, 8] * 8, 3, False),
        ([0, 2, 3, 3] * 16, INT4_MAX_ROWS + 5, True),
        ([0] * 64, 2, True),
    ],
)
def test_backward_is_grad_times_w(bits, rows, zero_in_range, dtype):
    """The backward to x is ``grad @ W`` within the forward's accuracy (same products, transposed), the
    bias gets ``grad.sum``, and the packed tensors get nothing (they are not inputs of the product)."""
    p = packed_layer(96, 64, 32, bits, seed=9, zero_in_range=zero_in_range)
    layout = build_cpu_layout(p)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, rows, 64, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(96, generator=g).requires_grad_()
    grad = torch.randn(2, rows, 96, generator=g).to(dtype)
    y = cpu_linear(x, layout, bias)
    y.backward(grad)
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    w, bound = weight_and_bound(p)
    ref, scale = grad.double() @ w, grad.double().abs() @ bound
    err = (x.grad.double() - ref).abs()
    assert bool((err <= TOL[dtype] * scale + 1e-30).all()), float((err / scale.clamp(min=1e-30)).max())
    torch.testing.assert_close(bias.grad, grad.float().sum((0, 1)))
    with torch.no_grad():  # without a gradient needed, the same product as before
        assert torch.equal(cpu_linear(x, layout, bias), y.detach())


def test_resident_bytes_at_3_bits():
    """About 1 byte per weight at 3 bits with groups of 64, no float weight: a group of 64 columns with a
    few pair digits and 5-bit columns pads to 96 int4 columns (0.75 byte per weight) plus 2-byte scales
    per 32 columns and row (0.19); the SmolLM2 checkpoint measures 0.88 over all layers."""
    bits = [2] * 150 + [3] * 300 + [4] * 120 + [5] * 6
    p = packed_layer(256, 576, 64, bits, seed=8)
    layout = build_cpu_layout(p)
    assert layout.nbytes() <= 1.125 * 256 * 576


def test_bf16_compute_for_fp32_inputs():
    """The opt-in bf16 product of fp32 inputs is the bf16 product of x rounded to bf16, returned in fp32;
    an unsupported compute dtype is refused."""
    p = packed_layer(130, 96, 32, [1, 2, 3, 4, 5, 8] * 16, seed=9)
    layout = build_cpu_layout(p)
    bias = torch.randn(130)
    for rows in (1, INT4_MAX_ROWS + 3):  # the int4 kernel and the decode path
        x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
        y = cpu_linear(x, layout, bias, torch.bfloat16)
        assert y.dtype == torch.float32
        assert torch.equal(y, cpu_linear(x.bfloat16(), layout, bias).float())
        ref, scale = reference_and_scale(p, x.bfloat16())
        err = (y.double() - ref - bias.bfloat16().double()).abs()
        assert bool((err <= TOL[torch.bfloat16] * (scale + bias.double().abs())).all())
    with pytest.raises(ValueError, match=r"use torch\.bfloat16 or torch\.float32"):
        cpu_linear(x, layout, bias, torch.float16)


def test_set_cpu_compute_dtype_on_a_layer():
    """The default CPU forward of fp32 inputs stays the exact fp32 product; the opt-in switches every
    BaqLinear of a model to bf16 and None switches it back."""
    from baq_hf.linear import BaqLinear, set_cpu_compute_dtype

    first, second = (
        packed_layer(64, 96, 32, [2, 3, 4] * 32, seed=10),
        packed_layer(64, 64, 32, [3] * 64, seed=11),
    )
    model = torch.nn.Sequential(BaqLinear.from_packed(first), torch.nn.ReLU(), BaqLinear.from_packed(second))
    a, b = build_cpu_layout(first), build_cpu_layout(second)
    x = torch.randn(2, 96)
    exact = model(x)
    assert torch.equal(exact, cpu_linear(cpu_linear(x, a).relu(), b))
    assert set_cpu_compute_dtype(model, torch.bfloat16) == 2
    fast = model(x)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)
    assert torch.equal(
        fast, cpu_linear(cpu_linear(x, a, None, torch.bfloat16).relu(), b, None, torch.bfloat16)
    )
    assert set_cpu_compute_dtype(model, None) == 2 and torch.equal(model(x), exact)
    with pytest.raises(ValueError, match="not supported"):
        set_cpu_compute_dtype(model, torch.float16)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_unpack_every_bitwidth_across_chunks(dtype, monkeypatch):
    """The byte-wise unpacking reads back every code of every bitwidth, also across chunk boundaries."""
    g = torch.Generator().manual_seed(12)
    for chunk in (8, 24, 1 << 22):
        monkeypatch.setattr(fmt, "_UNPACK_CHUNK", chunk)
        for bits in range(fmt.MAX_BITS + 1 if dtype != torch.uint8 else 9):
            for m, n in ((1, 1), (3, 5), (7, 13), (65, 9)):
                b = torch.full((n,), bits)
                codes = torch.randint(0, 1 << bits, (m, n), generator=g)
                got = fmt.unpack_codes(fmt.pack_codes(codes, b), fmt.segments_from_bits(b, m), m, dtype)
                assert got.dtype == dtype and torch.equal(got, codes.to(dtype)), (bits, m, n, chunk)
