"""Compile the BAQ kernels ahead of time for a GPU architecture, without a GPU, and read their code.

``triton.compile`` with an explicit ``GPUTarget`` runs Triton's whole pipeline and NVIDIA's ptxas on a
CPU machine. What the bandwidth of a memory-bound kernel needs can then be checked statically: the
weight stream read with 16-byte loads (``ld.global.v4.b32`` in the PTX), no local-memory spills
(``STL``/``LDL`` in the SASS, a stack frame), and the registers per thread (which bound occupancy).
The CI tests assert these for sm_90 (Hopper); ``benchmarks/kernel_static.py`` records the numbers.
The signatures below mirror the launchers in :mod:`.triton_kernels`, with the specializations the JIT
makes for Llama-like shapes (pointers 16-byte aligned, M and row strides multiples of 16).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_kernels as tk
from .configs import KernelConfig, fallback

HOPPER = GPUTarget("cuda", 90, 32)
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*i16", torch.float32: "*fp32"}  # bf16 out: int16 view
_X = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclass
class StaticReport:
    """What one compiled kernel variant does with memory and registers."""

    variant: str
    compile_s: float
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    spill_instructions: int  # STL/LDL in the SASS
    loads_v4_b32: int  # 16-byte global loads (the weight stream's words)
    expected_v4_loads: int
    loads_by_kind: dict[str, int]

    def row(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: ``widths`` is the gemv's set of bitwidths, ``batch`` the rows of x."""

    kernel: str
    dtype: torch.dtype
    config: KernelConfig
    widths: tuple[int, ...] = ()
    grouped: bool = False
    batch: int = 1

    @property
    def name(self) -> str:
        parts = [
            self.kernel,
            str(self.dtype).removeprefix("torch."),
            f"n{self.config.block_n}",
            f"k{self.config.block_k}",
            f"w{self.config.num_warps}",
        ]
        if self.widths:
            parts.append("bits" + ",".join(map(str, self.widths)))
        if self.kernel == "tile":
            parts.append(f"b{self.batch}")
        if self.grouped:
            parts.append("grouped")
        return "/".join(parts)

    def expected_v4_loads(self) -> int:
        """16-byte loads of code words per program that the layout allows: gemv, per word row of a run,
        (rows per thread) / 4 of them; tile and dequant, the low and high words of the code tile."""
        threads = 32 * self.config.num_warps
        if self.kernel == "gemv":
            return sum(self.widths) * (self.config.block_n // threads) // 4
        return 2 * self.config.block_n * self.config.block_k // (4 * threads)


# What the CI checks (a few seconds to a minute of compiling on a CPU): the fallback configs.
CI_VARIANTS = (
    Variant("gemv", torch.float16, fallback("gemv"), widths=(2, 3, 4)),
    Variant("tile", torch.float16, fallback("tile"), batch=16),
    Variant("tile", torch.bfloat16, fallback("tile"), batch=16, grouped=True),
    Variant("dequant", torch.float16, KernelConfig("dequant", 64, 64, 4)),
)


def _signature(names: list[str], types: dict[str, str]) -> dict[str, str]:
    return {n: types.get(n, "constexpr") for n in names}


def _attrs(names: list[str], aligned: set[str]) -> dict:
    return {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}


def source(v: Variant) -> ASTSource:
    """The ASTSource of a variant, specialized as the launcher's JIT call would be (with a bias)."""
    kernel, dtype, cfg, grouped, has_bias = v.kernel, v.dtype, v.config, v.grouped, True
    out = _PTR[dtype]
    common = dict(q_ptr="*i32", colmap_ptr="*i32", rmin_ptr="*fp16", rmax_ptr="*fp16", tile_ptr="*i32")
    prods = dict(x_ptr=_X[dtype], out_ptr=out, bias_ptr=_X[dtype], ws_ptr="*fp32", cnt_ptr="*i32", M="i32")
    if kernel == "gemv":
        fn = tk._gemv_kernel
        types = {**common, **prods, "n_tiles": "i32"}
        widths = sum(1 << r for r in v.widths)
        constexprs = dict(
            WIDTHS=widths, HAS_BIAS=has_bias, OUT_BF16=dtype == torch.bfloat16, BLOCK_N=cfg.block_n
        )
    elif kernel == "tile":
        fn = tk._tile_kernel
        types = {
            **common,
            **prods,
            "group_ptr": "*i32",
            "B": "i32",
            "G": "i32",
            "stride_xb": "i32",
            "stride_ob": "i32",
            "n_tiles": "i32",
        }
        constexprs = dict(
            GROUPED=grouped,
            HAS_BIAS=has_bias,
            OUT_BF16=dtype == torch.bfloat16,
            FACTOR_SCALE=not grouped,
            W_DTYPE=_TL[dtype],
            PRECISION="ieee" if dtype == torch.float32 else "tf32",
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            BLOCK_B=1 if v.batch == 1 else tk.MAX_TILE_ROWS,
        )
    elif kernel == "dequant":
        fn = tk._dequant_kernel
        types = {
            **common,
            "out_ptr": out,
            "group_ptr": "*i32",
            "M": "i32",
            "G": "i32",
            "stride_oc": "i32",
        }
        # W^T, the prefill path's form: the JIT makes its unit stride along the output a constant
        constexprs = dict(
            stride_on=1,
            GROUPED=grouped,
            OUT_BF16=dtype == torch.bfloat16,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
        )
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    names = list(fn.arg_names)
    aligned = {n for n, t in types.items() if t.startswith("*")} | {
        "M",
        "stride_xb",
        "stride_ob",
        "stride_oc",
    }
    aligned &= set(names)
    return ASTSource(
        fn=fn, signature=_signature(names, types), constexprs=constexprs, attrs=_attrs(names, aligned)
    )


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def analyze(v: Variant, target: GPUTarget = HOPPER) -> StaticReport:
    """Compile the variant for ``target`` and read its PTX and its cubin's resource usage and SASS."""
    t0 = time.perf_counter()
    compiled = triton.compile(source(v), target=target, options={"num_warps": v.config.num_warps})
    seconds = time.perf_counter() - t0
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [_cuobjdump(), "-res-usage", str(cubin)], capture_output=True, text=True, check=True
        )
        sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True)
    res = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.stdout))
    loads = Counter(re.findall(r"\bld\.global(?:\.[a-z0-9_]+)*", ptx))
    return StaticReport(
        variant=v.name,
        compile_s=round(seconds, 1),
        registers=int(res["REG"]),
        stack_bytes=int(res["STACK"]),
        local_bytes=int(res["LOCAL"]),
        shared_bytes=int(res["SHARED"]),
        spill_instructions=len(re.findall(r"\b(?:STL|LDL)\b", sass.stdout)),
        loads_v4_b32=sum(n for k, n in loads.items() if k.endswith(".v4.b32")),
        expected_v4_loads=v.expected_v4_loads(),
        loads_by_kind=dict(loads),
    )
