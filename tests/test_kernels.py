"""Triton kernels over the kernel layout vs the torch reference of baq_hf.format.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (small layers, small blocks, so
that every kernel runs several row tiles and K tiles; the interpreter runs each program in Python).
TRITON_INTERPRET must be set before triton itself is imported (triton.language's own @jit helpers read
it), hence the first lines below. When something imported triton earlier in this process (a conftest
importing transformers models pulls it in through torch._dynamo), the checks cannot run here: they are
skipped and
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
from baq_hf import kernels  # noqa: E402
from baq_hf.kernels import configs  # noqa: E402
from baq_hf.kernels import triton_kernels as tk  # noqa: E402
from baq_hf.linear import FORCE_TORCH_ENV, BaqLinear, prepare_kernel_layouts  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_layout(layer: BaqLinear) -> kernels.KernelLayout:
    return layer.kernel_layout()


def baq_linear_forward(x: torch.Tensor, layer: BaqLinear) -> torch.Tensor:
    """The kernel path of BaqLinear.forward (which takes it on CUDA only), on any device."""
    return kernels.linear(x, layer.kernel_layout(), layer.bias)


def dequantize_triton(layer: BaqLinear, dtype: torch.dtype) -> torch.Tensor:
    return kernels.dequantize(layer.kernel_layout(), dtype)
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
    packed = fmt.BaqWeight.pack(codes, bits, mn, mx, group_of_column)
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


# Small shapes. N is never a multiple of the blocks; widths up to 15 bits; 0-bit-only and one column.
LAYERS = {
    "mixed": dict(m=17, n=150, bits=_random_bits(150, list(range(9)), 1)),
    "wide": dict(m=3, n=70, bits=_random_bits(70, [0, 3, 8, 9, 11, 13, 15], 3), bias=False),
    "eight_only": dict(m=5, n=40, bits=8),
    "zero_only": dict(m=4, n=20, bits=0),
    "one_column": dict(m=6, n=1, bits=3),
    "long_segments": dict(m=9, n=300, bits=_random_bits(300, [2, 3, 4], 4)),
    "grouped": dict(m=17, n=96, bits=_random_bits(96, list(range(9)), 5), group_size=32),
    "grouped_shuffled": dict(
        m=6, n=64, bits=_random_bits(64, [0, 1, 2, 3, 5, 7], 6), group_size=16, shuffled_groups=True
    ),
}
PER_ROW = ["mixed", "wide", "eight_only", "zero_only", "one_column", "long_segments"]
# small blocks: several row tiles and K tiles even on these layers
GEMV = dict(block_n=16, block_k=64, num_warps=1)
TILE = dict(block_n=8, block_k=32, num_warps=4)

_cache: dict[str, BaqLinear] = {}


def layer(name: str) -> BaqLinear:
    if name not in _cache:
        _cache[name] = make_layer(**LAYERS[name])
    return _cache[name]


def assert_workspace_zero() -> None:
    """Every product leaves the shared workspace and the row-tile counters at zero."""
    for ws, cnt in tk.WORKSPACE._by_device.values():
        assert not ws.any() and not cnt.any()


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
# dequantizer: bit for bit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_dequantize_exact(name: str, dtype: torch.dtype) -> None:
    lay = layer(name)
    ref = lay.dequantize().to(dtype)
    out = dequantize_triton(lay, dtype)
    assert out.dtype == dtype and out.shape == (lay.out_features, lay.in_features)
    assert torch.equal(out, ref)
    if dtype == torch.float16:  # W^T, the prefill path's coalesced form
        assert torch.equal(tk.dequantize(kernel_layout(lay), dtype, transposed=True), ref.t())


def test_dequantize_matches_cpu_reference() -> None:
    """The kernel equals format's reference evaluated on CPU (on a GPU: guards its division rounding)."""
    lay = layer("grouped")
    ref = copy.deepcopy(lay).cpu().dequantize()
    assert torch.equal(dequantize_triton(lay, torch.float32).cpu(), ref)


# ------------------------------------------------------------------------------------------------
# products: each kernel called twice, the workspace all zero after each call


def check_product(run, x: torch.Tensor, lay: BaqLinear) -> None:
    first = run()
    assert_close_to_reference(first, x, lay)
    assert_workspace_zero()
    assert torch.equal(run(), first)
    assert_workspace_zero()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", PER_ROW)
def test_gemv(name: str, dtype: torch.dtype) -> None:
    lay = layer(name)
    layout = kernel_layout(lay)
    x = torch.randn(1, lay.in_features, device=DEVICE).to(dtype)
    bias = None if lay.bias is None else lay.bias.to(dtype)
    check_product(lambda: tk.gemv(x, layout, bias, **GEMV), x, lay)


@pytest.mark.parametrize(
    ("name", "batch", "dtype"),
    [(n, b, torch.float16) for n in ("mixed", "grouped") for b in (1, 2, 5, 16)]
    + [(n, 5, d) for n in ("mixed", "grouped_shuffled", "wide") for d in (torch.bfloat16, torch.float32)]
    + [("grouped", 1, torch.bfloat16), ("long_segments", 16, torch.float32), ("zero_only", 2, torch.float16)],
    ids=str,
)
def test_tile_matmul(name: str, batch: int, dtype: torch.dtype) -> None:
    lay = layer(name)
    layout = kernel_layout(lay)
    x = torch.randn(batch, lay.in_features, device=DEVICE).to(dtype)
    bias = None if lay.bias is None else lay.bias.to(dtype)
    check_product(lambda: tk.tile_matmul(x, layout, bias, **TILE), x, lay)


def test_products_reject_bad_arguments() -> None:
    layout = kernel_layout(layer("mixed"))
    x = torch.randn(2, 150, device=DEVICE).half()
    with pytest.raises(ValueError, match="one row"):
        tk.gemv(x, layout, None, **GEMV)
    with pytest.raises(ValueError, match="at most 16"):
        tk.tile_matmul(torch.randn(17, 150, device=DEVICE).half(), layout, None, **TILE)
    with pytest.raises(ValueError, match=r"\(rows, 150\)"):
        tk.tile_matmul(torch.randn(2, 149, device=DEVICE).half(), layout, None, **TILE)
    with pytest.raises(TypeError, match="fp16, bf16 and fp32"):
        tk.tile_matmul(x.double(), layout, None, **TILE)
    with pytest.raises(ValueError, match="per-row"):
        tk.gemv(
            torch.randn(1, 64, device=DEVICE).half(), kernel_layout(layer("grouped_shuffled")), None, **GEMV
        )


# ------------------------------------------------------------------------------------------------
# BaqLinear's CUDA forward: dispatch, layout caching, the torch op


@pytest.mark.parametrize(
    ("shape", "dtype", "name"),
    [
        ((1, 1), torch.float16, "mixed"),  # one row, per-row ranges: GEMV
        ((1,), torch.bfloat16, "grouped"),  # one row, grouped: tile kernel
        ((2, 3), torch.float16, "grouped_shuffled"),  # 6 rows: tile kernel with a dot
        ((3, 7), torch.bfloat16, "mixed"),  # 21 rows: dequantize W^T + matmul
        ((17,), torch.float32, "grouped"),
    ],
    ids=["1row", "1row-grouped-bf16", "6rows", "21rows", "17rows"],
)
def test_baq_linear_forward(shape: tuple[int, ...], dtype: torch.dtype, name: str) -> None:
    lay = layer(name)
    x = torch.randn(*shape, lay.in_features, device=DEVICE).to(dtype)
    y = baq_linear_forward(x, lay)
    assert y.shape == (*shape, lay.out_features)
    assert_close_to_reference(y.reshape(-1, lay.out_features), x.reshape(-1, lay.in_features), lay)


def test_layout_cached_and_rebuilt_after_changes() -> None:
    lay = make_layer(4, 33, _random_bits(33, [1, 2, 3], 7))
    layout = kernel_layout(lay)
    assert kernel_layout(lay) is layout
    assert prepare_kernel_layouts(torch.nn.Sequential(lay)) == (DEVICE.type == "cuda")  # CUDA layers only
    assert kernel_layout(lay) is layout
    # new stored tensors (as after loading another checkpoint into the module) give a new layout
    other = make_layer(4, 33, _random_bits(33, [1, 2, 3], 7), seed=8)
    lay.load_state_dict(other.state_dict())
    x = torch.randn(1, 33, device=DEVICE).half()
    y = baq_linear_forward(x, lay)
    assert lay._kernel_layout is not layout
    assert_close_to_reference(y, x, lay)
    layout = kernel_layout(lay)
    lay.post_init()  # a new header
    assert kernel_layout(lay) is not layout
    layout = kernel_layout(lay)
    lay.to(DEVICE)  # device moves (here a no-op move) drop it too
    assert kernel_layout(lay) is not layout


def test_layout_holds_the_codes_and_gives_them_back() -> None:
    """Once the layout is built the layer keeps one copy of the codes (in the layout); the stored words
    come back bit for bit through qweight, state_dict, deep copies, device moves and loading."""
    lay = make_layer(7, 90, _random_bits(90, [0, 2, 3, 5], 9), group_size=30)
    before = {k: v.clone() for k, v in lay.state_dict().items()}
    bits = lay.effective_bits
    x = torch.randn(2, 90, device=DEVICE).half()
    y = baq_linear_forward(x, lay)
    assert lay.weight.numel() == 0 and lay._codes_in_layout
    assert lay.kernel_codes is kernel_layout(lay).codes  # a buffer: memory accounting sees the codes
    assert torch.equal(lay.qweight, before["weight"]) and lay.effective_bits == bits
    assert all(torch.equal(v, before[k]) for k, v in lay.state_dict().items())
    twin = copy.deepcopy(lay)
    assert torch.equal(baq_linear_forward(x, twin), y)
    assert kernel_layout(twin).op_key != kernel_layout(lay).op_key  # the op finds each copy's own layout
    lay.to(DEVICE)  # a device move puts the words back into weight
    assert torch.equal(lay.qweight, before["weight"]) and lay._kernel_layout is None
    assert "kernel_codes" not in dict(lay.named_buffers())
    baq_linear_forward(x, twin)
    twin.load_state_dict(before)  # loading into a layer whose layout holds the codes
    assert torch.equal(twin.qweight, before["weight"]) and not twin._codes_in_layout
    assert torch.equal(baq_linear_forward(x, twin), y)


def test_offloaded_layers_keep_no_layout() -> None:
    """accelerate's offload hooks move a layer's tensors in per call: no layout may stay behind."""
    lay = make_layer(5, 40, 3)
    lay._hf_hook = type("Hook", (), {"offload": True})()
    x = torch.randn(1, 40, device=DEVICE).half()
    assert_close_to_reference(baq_linear_forward(x, lay), x, lay)
    assert lay._kernel_layout is None and lay.weight.numel() > 0


def test_torch_op_and_fake_tensors() -> None:
    """torch.ops.baq_hf.linear passes torch.library's checks (schema, fake implementation, ...)."""
    lay = layer("mixed")
    layout = kernel_layout(lay)
    x = torch.randn(3, lay.in_features, device=DEVICE).half()
    torch.library.opcheck(
        torch.ops.baq_hf.linear.default,
        (x, lay.bias, layout.op_key),
        test_utils=("test_schema", "test_faketensor"),
    )
    assert_close_to_reference(torch.ops.baq_hf.linear(x, lay.bias, layout.op_key), x, lay)


@pytest.mark.parametrize(("name", "rows"), [("mixed", 3), ("grouped_shuffled", 20), ("zero_only", 2)])
def test_backward_to_the_input(name: str, rows: int) -> None:
    """With x (and the bias) needing a gradient the product goes through the op, whose backward is
    ``grad @ W`` (W from the Triton dequantizer); nothing reaches the packed tensors."""
    lay = layer(name)
    layout = kernel_layout(lay)
    x = torch.randn(2, rows, lay.in_features, device=DEVICE, requires_grad=True)
    bias = torch.randn(lay.out_features, device=DEVICE, requires_grad=True)
    grad = torch.randn(2, rows, lay.out_features, device=DEVICE)
    kernels.linear(x, layout, bias).backward(grad)
    w = lay.dequantize(torch.float32).to(DEVICE)
    torch.testing.assert_close(x.grad, grad @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, grad.sum((0, 1)))
    assert all(not t.requires_grad and t.grad is None for t in lay.buffers())
    torch.library.opcheck(
        torch.ops.baq_hf.linear.default,
        (x.detach().requires_grad_(), lay.bias, layout.op_key),
        test_utils=("test_autograd_registration",),
    )


def test_backward_under_compile() -> None:
    """torch.compile traces the op's autograd (one graph, the backward through the dequantizer)."""
    lay = layer("grouped")
    layout = kernel_layout(lay)
    compiled = torch.compile(lambda x: kernels.linear(x, layout, None), fullgraph=True, backend="aot_eager")
    x = torch.randn(3, lay.in_features, device=DEVICE, requires_grad=True)
    compiled(x).sum().backward()
    w = lay.dequantize(torch.float32).to(DEVICE)
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)


def test_compiles_without_graph_breaks() -> None:
    """torch.compile traces BaqLinear's kernel forward in one graph (fullgraph), through the op."""
    lay = layer("grouped")
    kernel_layout(lay)  # built before compiling, as prepare_kernel_layouts() does on a GPU
    compiled = torch.compile(lambda x: baq_linear_forward(x, lay) * 2, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, lay.in_features, device=DEVICE).half()
    y = compiled(x)
    assert_close_to_reference(y / 2, x, lay)


def test_tuned_table_and_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def choose(rows: int, grouped: bool = False, gemv_ok: bool = True) -> configs.KernelConfig:
        return configs.choose(DEVICE, 17, 150, 8, rows, torch.float16, grouped, gemv_ok)

    assert choose(1) == configs.fallback("gemv")
    assert choose(1, grouped=True, gemv_ok=False) == choose(2) == configs.fallback("tile")
    tuned = configs.KernelConfig("tile", block_n=32, block_k=32, num_warps=2)  # a tile kernel for one row
    table = {
        configs.table_key(17, 150, 8, b, torch.float16, False): {**configs.config_dict(tuned), "us": 1.0}
        for b in (1, 4)
    }
    path = tmp_path / "table.json"
    configs.write_table(path, "test", "pytest", table)
    monkeypatch.setenv(configs.CONFIGS_ENV, str(path))
    assert choose(1) == choose(3) == tuned
    assert choose(2) == configs.fallback("tile")  # bucket 2 is not in the table
    for kernel in ("gemv", "tile"):
        grid = configs.candidates(kernel)
        assert configs.fallback(kernel) in grid and len(grid) == len(set(grid)) <= 40
    monkeypatch.setenv(configs.CONFIGS_ENV, str(tmp_path / "absent.json"))
    with pytest.raises(FileNotFoundError, match=configs.CONFIGS_ENV):
        choose(1)


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
    """Native (not interpreted) kernels on layers of realistic size, BaqLinear.forward on CUDA, graphs."""

    @pytest.fixture(scope="class")
    def big(self) -> dict[str, BaqLinear]:
        return {
            "rows": make_layer(1536, 576, _random_bits(576, [0, 1, 2, 3, 4, 5, 8], 11), seed=1),
            "grouped": make_layer(576, 1536, _random_bits(1536, [0, 2, 3, 4, 6], 12), group_size=128),
            "wide": make_layer(304, 1000, _random_bits(1000, [0, 8, 9], 13), bias=False),  # codes > 8 bits
        }

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("name", ["rows", "grouped", "wide"])
    def test_dequantize_exact(self, big: dict[str, BaqLinear], name: str, dtype: torch.dtype) -> None:
        lay = big[name]
        ref = copy.deepcopy(lay).cpu().dequantize().to(dtype)
        assert torch.equal(dequantize_triton(lay, dtype).cpu(), ref)

    # (layer, dtype) pairs rather than all of them: every GEMV variant compiles code per bitwidth
    @pytest.mark.parametrize(
        ("name", "dtype"),
        [
            ("rows", torch.float16),
            ("rows", torch.bfloat16),
            ("grouped", torch.float16),
            ("grouped", torch.float32),
            ("wide", torch.float32),
            ("wide", torch.bfloat16),
        ],
        ids=str,
    )
    def test_products(self, big: dict[str, BaqLinear], name: str, dtype: torch.dtype) -> None:
        """The forward's dispatch at 1, 2, 5 and 16 rows, and for fp16 one more config of each kernel."""
        from baq_hf.kernels import ops

        lay = big[name]
        layout = kernel_layout(lay)
        bias = None if lay.bias is None else lay.bias.to(dtype)
        tile = configs.candidates("tile")[3].launch_args()
        gemv = configs.candidates("gemv")[-1].launch_args()
        for batch in (1, 2, 5, 16):
            x = torch.randn(batch, lay.in_features, device="cuda").to(dtype)
            check_product(lambda x=x: ops.linear(x, layout, bias), x, lay)
            if dtype == torch.float16:
                check_product(lambda x=x: tk.tile_matmul(x, layout, bias, **tile), x, lay)
                if batch == 1 and not layout.grouped:
                    check_product(lambda x=x: tk.gemv(x, layout, bias, **gemv), x, lay)

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

    def test_cuda_graph_replay(self, big: dict[str, BaqLinear]) -> None:
        """A captured forward replays correctly: no allocation or host work is left outside the graph."""
        lay = big["rows"]
        x = torch.randn(1, lay.in_features, device="cuda").half()
        lay(x)  # builds the layout and the workspace, compiles the kernel
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = lay(x)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            assert_close_to_reference(y, x, lay)
        assert_workspace_zero()

    def test_compile_reduce_overhead(self, big: dict[str, BaqLinear]) -> None:
        lay = big["rows"]
        prepare_kernel_layouts(torch.nn.Sequential(lay))
        fn = torch.compile(lambda x: lay(x), mode="reduce-overhead", fullgraph=True)
        for _ in range(3):
            x = torch.randn(1, lay.in_features, device="cuda").half()
            assert_close_to_reference(fn(x).clone(), x, lay)
