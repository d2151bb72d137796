"""Launch configurations of the BAQ kernels: a small pruned grid, tuned tables per GPU, a fallback.

A kernel and its configuration are chosen per (M, N, max bits, batch bucket, activation dtype,
grouped). Tables measured on a GPU (``benchmarks/kernels.py --tune`` writes them) live in
``baq_hf/kernels/tuned/<gpu>.json``, or in the file named by ``BAQ_HF_KERNEL_CONFIGS``; a shape that
no table covers gets :func:`fallback`, a guess that keeps 16-byte loads and enough programs in
flight. No timing is ever made up: a table holds only what a GPU run measured, with its command.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

CONFIGS_ENV = "BAQ_HF_KERNEL_CONFIGS"
TUNED_DIR = Path(__file__).with_name("tuned")
BATCH_BUCKETS = (1, 2, 4, 8, 16)
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class KernelConfig:
    """``kernel`` "gemv" (one row, per-row ranges) or "tile" (1-16 rows); ``block_k`` is a multiple of 32
    (for gemv, 32 x RUNS with RUNS a power of two)."""

    kernel: str
    block_n: int
    block_k: int
    num_warps: int

    def launch_args(self) -> dict[str, int]:
        return dict(block_n=self.block_n, block_k=self.block_k, num_warps=self.num_warps)


def batch_bucket(rows: int) -> int:
    """The smallest bucket >= rows (rows 1..16)."""
    for b in BATCH_BUCKETS:
        if rows <= b:
            return b
    raise ValueError(f"the fused kernels take at most {BATCH_BUCKETS[-1]} rows, got {rows}")


def table_key(m: int, n: int, max_bits: int, bucket: int, dtype: torch.dtype, grouped: bool) -> str:
    return f"{m}x{n}/r{max_bits}/b{bucket}/{_DTYPE_NAMES[dtype]}/{'g' if grouped else 'row'}"


def candidates(kernel: str) -> list[KernelConfig]:
    """The pruned grid a tuning run times.

    gemv: a program covers ``block_n`` output rows, 4 or 8 per thread (one or two 16-byte loads per
    word row; fewer would lose the vector loads, more would hold 8-bit runs' words in too many
    registers), and walks ``block_k`` columns. tile: 8..64 elements of the code tile per thread.
    """
    out = []
    if kernel == "gemv":
        for warps in (1, 2, 4):
            for per_thread in (4, 8):
                for block_k in (32, 64, 128, 256):
                    out.append(KernelConfig("gemv", 32 * warps * per_thread, block_k, warps))
    elif kernel == "tile":
        for block_n in (32, 64, 128):
            for block_k in (32, 64, 128):
                for warps in (2, 4, 8):
                    if 8 <= block_n * block_k // (32 * warps) <= 64:
                        out.append(KernelConfig("tile", block_n, block_k, warps))
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return out


def fallback(kernel: str) -> KernelConfig:
    """Untuned defaults. gemv: 4 rows per thread (one 16-byte load per word row) and K tiles of 64
    columns, which gives a 4096 x 4096 layer 16 row tiles x ~70 K tiles, about 8 programs per SM of an
    H100 or H200. tile: a 64 x 64 code tile per 4 warps."""
    if kernel == "gemv":
        return KernelConfig("gemv", block_n=256, block_k=64, num_warps=2)
    return KernelConfig("tile", block_n=64, block_k=64, num_warps=4)


def gpu_slug(name: str) -> str:
    """File name for a GPU's table: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@lru_cache(maxsize=8)
def load_table(path: str) -> dict[str, KernelConfig]:
    """The entries of a tuned table (``{"entries": {key: {kernel, block_n, block_k, num_warps, ...}}}``)."""
    data = json.loads(Path(path).read_text())
    fields = ("kernel", "block_n", "block_k", "num_warps")
    return {key: KernelConfig(**{f: e[f] for f in fields}) for key, e in data.get("entries", {}).items()}


def table_path(device: torch.device) -> Path | None:
    """The table to use on ``device``: $BAQ_HF_KERNEL_CONFIGS, else the shipped one for its GPU name."""
    env = os.environ.get(CONFIGS_ENV)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(
                f"{CONFIGS_ENV}={env} is not a file; unset it, or point it at a table written by "
                "`python benchmarks/kernels.py --tune`"
            )
        return Path(env)
    if device.type != "cuda":
        return None
    path = TUNED_DIR / f"{gpu_slug(torch.cuda.get_device_name(device))}.json"
    return path if path.exists() else None


def choose(
    device: torch.device,
    m: int,
    n: int,
    max_bits: int,
    rows: int,
    dtype: torch.dtype,
    grouped: bool,
    gemv_ok: bool,
) -> KernelConfig:
    """The kernel and configuration for ``rows`` (1-16) rows of x: the tuned table's entry for this shape
    if there is one (and it is usable: the GEMV needs ``gemv_ok``), else :func:`fallback` (the GEMV for
    one row when it can, the tile kernel otherwise)."""
    path = table_path(device)
    if path is not None:
        entry = load_table(str(path)).get(table_key(m, n, max_bits, batch_bucket(rows), dtype, grouped))
        if entry is not None and (entry.kernel == "tile" or (gemv_ok and rows == 1)):
            return entry
    return fallback("gemv" if gemv_ok and rows == 1 else "tile")


def write_table(path: Path, gpu: str, command: str, entries: dict[str, dict]) -> None:
    """Write a tuned table: ``entries`` maps :func:`table_key` to a config dict plus its measured ``us``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {"gpu": gpu, "command": command, "entries": entries}
    path.write_text(json.dumps(table, indent=1, sort_keys=True))
    load_table.cache_clear()


def config_dict(cfg: KernelConfig) -> dict:
    return asdict(cfg)
