"""Launch configurations of the BAQ kernels: a small pruned grid, tuned tables per GPU, a fallback.

A configuration is chosen per (M, N, max bits, batch bucket, activation dtype). Tables measured on a
GPU (``benchmarks/kernels.py --tune`` writes them) live in ``baq_hf/kernels/tuned/<gpu>.json``, or in
the file named by ``BAQ_HF_KERNEL_CONFIGS``; a shape that no table covers gets :func:`fallback`, a
guess that keeps 16-byte loads and enough programs in flight. No timing is ever made up: a table
holds only what a GPU run measured, with its command.
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
    """The pruned grid a tuning run times. gemv: 16-byte loads need >= 4 words of a run row per thread,
    and R words of up to 8 bits times more than 16 per thread would not fit in registers; tile: 8..64
    elements of the code tile per thread."""
    out = []
    if kernel == "gemv":
        for block_n in (64, 128, 256):
            for runs in (1, 2, 4, 8):
                for warps in (1, 2, 4, 8):
                    per_thread = runs * block_n // (32 * warps)
                    if 4 <= per_thread <= 16:
                        out.append(KernelConfig("gemv", block_n, 32 * runs, warps))
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
    """Untuned defaults: 4 words per thread (one 16-byte load per run word) and K tiles of 128 or 64
    columns, which gives large layers about a thousand programs (4096 x 4096: 32 row tiles x 32+ K
    tiles), enough to keep every SM busy."""
    if kernel == "gemv":
        return KernelConfig("gemv", block_n=128, block_k=128, num_warps=4)
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
        return Path(env)
    if device.type != "cuda":
        return None
    path = TUNED_DIR / f"{gpu_slug(torch.cuda.get_device_name(device))}.json"
    return path if path.exists() else None


def choose(
    kernel: str,
    device: torch.device,
    m: int,
    n: int,
    max_bits: int,
    rows: int,
    dtype: torch.dtype,
    grouped: bool,
) -> KernelConfig:
    """The tuned configuration for this shape if a table has it, else :func:`fallback`."""
    path = table_path(device)
    if path is not None:
        entry = load_table(str(path)).get(table_key(m, n, max_bits, batch_bucket(rows), dtype, grouped))
        if entry is not None and entry.kernel == kernel:
            return entry
    return fallback(kernel)


def write_table(path: Path, gpu: str, command: str, entries: dict[str, dict]) -> None:
    """Write a tuned table: ``entries`` maps :func:`table_key` to a config dict plus its measured ``us``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {"gpu": gpu, "command": command, "entries": entries}
    path.write_text(json.dumps(table, indent=1, sort_keys=True))
    load_table.cache_clear()


def config_dict(cfg: KernelConfig) -> dict:
    return asdict(cfg)
