"""Triton kernels vs the torch reference of baq_hf.format.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. TRITON_INTERPRET must be set
before triton itself is imported (triton.language's own @jit helpers read it), hence the first lines
below. When something imported triton earlier in this process (a conftest importing transformers
models pulls it in through torch._dynamo), the checks cannot run here: they are skipped and
test_whole_module_in_fresh_process runs this file again in a fresh interpreter-mode process.
With a GPU the same checks run natively on CUDA, and TestGpu adds larger layers and BaqLinear.forward
on CUDA vs the torch path.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch

_NEED_INTERPRETER = not torch.cuda.is_available()
# triton imported before the flag was set: its kernels would not be interpreted
_STALE_TRITON = _NEED_INTERPRETER and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if _NEED_INTERPRETER:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from baq_hf import format as fmt  # noqa: E402
from baq_hf.format import pack_weight  # noqa: E402
from baq_hf.kernels import baq_linear_forward, dequantize_triton  # noqa: E402
from baq_hf.kernels import triton_kernels as tk  # noqa: E402
from baq_hf.linear import FORCE_TORCH_ENV, BaqLinear  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def make_layer(
    m: int,
    n: int,
    bits: torch.Tensor | list[int] | int,
    group_size: int = -1,
    bias: bool = True,
    seed: int = 0,
    shuffled_groups: bool = False,
    device: torch.device = DEVICE,
) -> BaqLinear:
    """A BaqLinear with random codes (within each column's width) and fp16 ranges fitted to a random W."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.full((n,), bits) if isinstance(bits, int) else torch.as_tensor(bits)
    codes = torch.zeros(m, n, dtype=torch.long)
    for j, b in enumerate(bits.tolist()):
        codes[:, j] = torch.randint(0, 1 << b, (m,), generator=g)
    w = torch.randn(m, n, generator=g) * 0.05
    if group_size == -1:
        mn, mx = fmt.fit_range(w, sym=False)
        mn, mx, group_of_column = mn[:, None], mx[:, None], None
    else:
        n_groups = n // group_size
        group_of_column = torch.arange(n) // group_size
        if shuffled_groups:  # act-order style: a group's columns are scattered over the matrix
            group_of_column = group_of_column[torch.randperm(n, generator=g)]
        mn = torch.empty(m, n_groups, dtype=torch.float16)
        mx = torch.empty(m, n_groups, dtype=torch.float16)
        for gi in range(n_groups):
            mn[:, gi], mx[:, gi] = fmt.fit_range(w[:, group_of_column == gi], sym=False)
    packed = pack_weight(codes, bits, mn, mx, group_of_column)
    b = torch.randn(m, generator=g).half() if bias else None
    return BaqLinear.from_packed(packed, b).to(device)


@pytest.fixture(autouse=True)
def _skip_if_triton_stale(request: pytest.FixtureRequest) -> None:
    if _STALE_TRITON and request.node.name != "test_whole_module_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1; see test_whole_module_in_fresh_process")


@pytest.mark.skipif(not _STALE_TRITON, reason="the checks run in this process")
def test_whole_module_in_fresh_process() -> None:
    """Run this file in a process where TRITON_INTERPRET=1 precedes any triton import."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "--noconftest", "-p", "no:cacheprovider"]
    cmd += ["-k", "not test_whole_module_in_fresh_process"]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def _random_bits(n: int, choices: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(choices)
    return c[torch.randint(0, len(c), (n,), generator=g)]


# Small shapes: the interpreter runs every program in Python. N is never a multiple of the blocks.
LAYERS = {
    **{f"bits{r}": dict(m=5, n=45, bits=r) for r in range(9)},
    "mixed": dict(m=17, n=150, bits=_random_bits(150, list(range(9)), 1)),
    "mixed_m1_nobias": dict(m=1, n=70, bits=_random_bits(70, list(range(9)), 2), bias=False),
    "mixed_m3_wide": dict(m=3, n=40, bits=_random_bits(40, [0, 3, 8, 9, 11, 13, 15], 3)),
    "long_segments": dict(m=20, n=700, bits=_random_bits(700, [2, 3, 4], 4)),
    "grouped": dict(m=17, n=96, bits=_random_bits(96, list(range(9)), 5), group_size=32),
    "grouped_shuffled": dict(
        m=6, n=64, bits=_random_bits(64, [0, 1, 2, 3, 5, 7], 6), group_size=16, shuffled_groups=True
    ),
}
MIXED = ["mixed", "mixed_m1_nobias", "mixed_m3_wide", "long_segments", "grouped", "grouped_shuffled"]

_cache: dict[str, BaqLinear] = {}


def layer(name: str) -> BaqLinear:
    if name not in _cache:
        _cache[name] = make_layer(**LAYERS[name])
    return _cache[name]


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, lay: BaqLinear) -> None:
    """|y - x W^T - b| within the rounding the activation dtype allows.

    Bound: eps_out * |ref| (output rounding) + eps_w * sum|w x| (weights rounded for the dot product:
    fp16 on fp16 tensor cores, tf32 or bf16 otherwise) + fp32 accumulation.
    """
    w = lay.dequantize()
    bias = None if lay.bias is None else lay.bias.to(x.dtype).float()
    ref = F.linear(x.float(), w, bias)
    mag = F.linear(x.float().abs(), w.abs(), None if bias is None else bias.abs())
    eps_out, eps_w = {
        torch.float16: (2.0**-11, 2.0**-11),
        torch.bfloat16: (2.0**-8, 2.0**-8),
        torch.float32: (0.0, 0.0),
    }[x.dtype]
    tol = 2 * (eps_out * ref.abs() + eps_w * mag) + 1e-5 * mag + 1e-6
    err = (y.float() - ref).abs()
    assert y.dtype == x.dtype
    assert bool((err <= tol).all()), (
        f"max err {err.max().item():.3g}, tol there {tol.flatten()[err.argmax()]:.3g}"
    )


# ------------------------------------------------------------------------------------------------
# dequantize kernel: bit for bit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_dequantize_exact(name: str, dtype: torch.dtype) -> None:
    lay = layer(name)
    ref = lay.dequantize().to(dtype)
    out = dequantize_triton(lay, dtype)
    assert out.dtype == dtype and out.shape == (lay.out_features, lay.in_features)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", ["mixed", "grouped_shuffled"])
def test_dequantize_stored_order(name: str) -> None:
    lay = layer(name)
    ref = lay.dequantize()[:, lay.perm.long()].half()
    assert torch.equal(tk.dequantize(lay, torch.float16, stored_order=True), ref)


def test_dequantize_matches_cpu_reference() -> None:
    """The kernel equals format's reference evaluated on CPU (on a GPU: guards its division rounding)."""
    lay = layer("grouped")
    ref = copy.deepcopy(lay).cpu().dequantize()
    assert torch.equal(dequantize_triton(lay, torch.float32).cpu(), ref)


# ------------------------------------------------------------------------------------------------
# fused GEMV


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("name", list(LAYERS))
def test_fused_per_code_fp16(name: str, batch: int) -> None:
    lay = layer(name)
    x = torch.randn(batch, lay.in_features, device=DEVICE).half()
    assert_close_to_reference(tk.fused_linear(x, lay, impl="per_code"), x, lay)


@pytest.mark.parametrize("name", list(LAYERS))
def test_fused_chunked_fp16(name: str) -> None:
    """The word-level batch-1 kernel (the default for one row)."""
    lay = layer(name)
    x = torch.randn(1, lay.in_features, device=DEVICE).half()
    assert_close_to_reference(tk.fused_linear(x, lay), x, lay)


@pytest.mark.parametrize("batch", [5, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", MIXED)
def test_fused_other_dtypes(name: str, dtype: torch.dtype, batch: int) -> None:
    lay = layer(name)
    x = torch.randn(batch, lay.in_features, device=DEVICE).to(dtype)
    assert_close_to_reference(tk.fused_linear(x, lay), x, lay)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", ["mixed_m3_wide", "grouped_shuffled"])
def test_fused_batch1_other_dtypes(name: str, dtype: torch.dtype) -> None:
    lay = layer(name)
    x = torch.randn(1, lay.in_features, device=DEVICE).to(dtype)
    assert_close_to_reference(tk.fused_linear(x, lay, impl="chunked"), x, lay)
    assert_close_to_reference(tk.fused_linear(x, lay, impl="per_code"), x, lay)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["mixed", "grouped", "long_segments"])
def test_fused_split_k(name: str, dtype: torch.dtype) -> None:
    """Split-K (fp32 atomics, bias added once) and non-default blocks give the same result."""
    lay = layer(name)
    x = torch.randn(4, lay.in_features, device=DEVICE).to(dtype)
    assert_close_to_reference(tk.fused_linear(x, lay, split=3), x, lay)
    assert_close_to_reference(tk.fused_linear(x, lay, block_m=16, block_k=32, split=2), x, lay)
    x1 = x[:1]
    assert_close_to_reference(tk.fused_linear(x1, lay, impl="per_code", split=3), x1, lay)


@pytest.mark.parametrize("name", ["mixed_m3_wide", "long_segments"])
def test_fused_chunked_split_k_and_blocks(name: str) -> None:
    lay = layer(name)
    x = torch.randn(1, lay.in_features, device=DEVICE).to(torch.bfloat16)
    assert_close_to_reference(tk.fused_linear(x, lay, split=3), x, lay)
    assert_close_to_reference(tk.fused_linear(x, lay, block_m=8, block_k=64, split=2), x, lay)


def test_fused_rejects_bad_arguments() -> None:
    lay = layer("bits3")
    with pytest.raises(ValueError, match="chunked"):
        tk.fused_linear(torch.randn(2, lay.in_features, device=DEVICE).half(), lay, impl="chunked")
    with pytest.raises(ValueError, match="block_k"):
        tk.fused_linear(torch.randn(1, lay.in_features, device=DEVICE).half(), lay, block_k=96)
    with pytest.raises(ValueError, match="at most"):
        tk.fused_linear(torch.randn(17, lay.in_features, device=DEVICE).half(), lay)
    with pytest.raises(TypeError):
        tk.fused_linear(torch.randn(1, lay.in_features, device=DEVICE).double(), lay)


def test_fused_strided_input() -> None:
    lay = layer("mixed")
    x = torch.randn(lay.in_features, 4, device=DEVICE).half().t()  # rows of x are not contiguous
    assert_close_to_reference(tk.fused_linear(x, lay), x, lay)


# ------------------------------------------------------------------------------------------------
# dispatch


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((1, 1), torch.float16),  # one row: fused GEMV
        ((1,), torch.bfloat16),
        ((2, 3), torch.float16),  # 6 rows: dequantize + matmul
        ((3, 7), torch.bfloat16),
        ((17,), torch.float32),
    ],
    ids=["1row", "1row-bf16", "6rows", "21rows", "17rows"],
)
def test_baq_linear_forward(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    lay = layer("grouped")
    x = torch.randn(*shape, lay.in_features, device=DEVICE).to(dtype)
    y = baq_linear_forward(x, lay)
    assert y.shape == (*shape, lay.out_features)
    assert_close_to_reference(y.reshape(-1, lay.out_features), x.reshape(-1, lay.in_features), lay)


def test_launch_metadata_cached_and_invalidated() -> None:
    lay = make_layer(4, 33, _random_bits(33, [1, 2, 3], 7))
    x = torch.randn(1, 33, device=DEVICE).half()
    tk.fused_linear(x, lay)
    meta = lay._baq_kernel_meta
    tk.fused_linear(x, lay)
    assert lay._baq_kernel_meta is meta
    # new packed data (as after loading another checkpoint into the module) rebuilds the tables
    other = make_layer(4, 33, _random_bits(33, [0, 4, 5], 8))
    lay.qweight.data = other.qweight.clone()  # new storage, as load_state_dict(assign=True) gives
    lay.bits_header.copy_(other.bits_header)
    lay.perm.copy_(other.perm)
    lay.range_min.copy_(other.range_min)
    lay.range_max.copy_(other.range_max)
    lay.post_init()
    y = tk.fused_linear(x, lay)
    assert lay._baq_kernel_meta is not meta
    assert_close_to_reference(y, x, lay)


def test_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lay = make_layer(3, 10, 2, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CUDA"):
        baq_linear_forward(torch.randn(1, 10), lay)


# ------------------------------------------------------------------------------------------------
# real GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestGpu:
    """Native (not interpreted) kernels on layers of realistic size, and BaqLinear.forward on CUDA."""

    @pytest.fixture(scope="class")
    def big(self) -> dict[str, BaqLinear]:
        return {
            "rows": make_layer(1536, 576, _random_bits(576, [0, 1, 2, 3, 4, 5, 8], 11), seed=1),
            "grouped": make_layer(576, 1536, _random_bits(1536, [0, 2, 3, 4, 6], 12), group_size=128),
            "wide": make_layer(300, 1000, _random_bits(1000, [2, 3, 7, 9, 15], 13), bias=False),
        }

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("name", ["rows", "grouped", "wide"])
    def test_dequantize_exact(self, big: dict[str, BaqLinear], name: str, dtype: torch.dtype) -> None:
        lay = big[name]
        ref = copy.deepcopy(lay).cpu().dequantize().to(dtype)
        assert torch.equal(dequantize_triton(lay, dtype).cpu(), ref)

    @pytest.mark.parametrize("batch", [1, 2, 8, 16])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("name", ["rows", "grouped", "wide"])
    def test_fused(self, big: dict[str, BaqLinear], name: str, dtype: torch.dtype, batch: int) -> None:
        lay = big[name]
        x = torch.randn(batch, lay.in_features, device="cuda").to(dtype)
        assert_close_to_reference(tk.fused_linear(x, lay), x, lay)
        assert_close_to_reference(tk.fused_linear(x, lay, split=4), x, lay)
        assert_close_to_reference(tk.fused_linear(x, lay, impl="per_code", split=1), x, lay)

    @pytest.mark.parametrize("rows", [1, 8, 64])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    def test_forward_vs_torch_path(
        self, big: dict[str, BaqLinear], monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, rows: int
    ) -> None:
        lay = big["grouped"]
        x = torch.randn(rows, lay.in_features, device="cuda").to(dtype)
        monkeypatch.delenv(FORCE_TORCH_ENV, raising=False)
        y = lay(x)
        monkeypatch.setenv(FORCE_TORCH_ENV, "1")
        y_torch = lay(x)
        assert y.dtype == y_torch.dtype == dtype
        assert_close_to_reference(y, x, lay)
        assert_close_to_reference(y_torch, x, lay)
