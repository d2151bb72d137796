"""How long a quantization will take here, said before it starts (the defaults take hours on a CPU).

The estimate counts the arithmetic of the calibration from the model's layer shapes and the settings
(the block forward passes over the calibration tokens, the Hessians, the GPTQ solves, the clip search
and the sanity check), divides it by the rate of a float32 matmul measured on the device just now (a
loaded machine gives a longer estimate) and multiplies by :data:`OVERHEAD`, the ratio of measured
wall time to that matmul-rate time, fitted on runs of the embedded SmolLM2-135M on a 2-core x86_64 CPU
(see the constant). It is a rough guide: within a factor of about 2 on the runs it was checked on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# measured wall time / (FLOPs counted here / matmul rate measured here) on SmolLM2-135M, 2-core x86_64
# CPU, 1 thread: 3 bits per row with 4 windows of 256 tokens (see the report of issue 25)
OVERHEAD = 3.0
CLIP_CANDIDATES = 21  # ranges tried per row/group by clip_search (baq_hf.clipping)
CLIP_FLOPS_PER_WEIGHT = 12  # round, subtract, square, weight and sum per candidate (elementwise)
SANITY_WINDOWS, SANITY_SEQLEN = 4, 512  # as baq_hf.sanity (not imported: it imports torch)
SLOW_SECONDS = 600.0  # warn above this


@dataclass
class Estimate:
    """The expected seconds of a quantization and how they were obtained."""

    seconds: float
    flops: float
    rate: float  # FLOP/s of the matmul measured on the device
    device: str

    def text(self) -> str:
        return (
            f"expected quantization time on {self.device}: about {duration(self.seconds)} "
            f"({self.flops / 1e12:.2f} TFLOP of block passes, Hessians and GPTQ solves at "
            f"{self.rate / 1e9:.1f} GFLOP/s measured now, x{OVERHEAD:g} for the work that runs below "
            "matmul speed; a rough guide)"
        )


def duration(seconds: float) -> str:
    """Seconds as a short human duration (s, min or h)."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def matmul_rate(device: Any, seconds: float = 0.2) -> float:
    """FLOP/s of repeated float32 matmuls on ``device`` (measured for about ``seconds``)."""
    import torch

    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    (a @ b).sum().item()  # warm-up (and CUDA initialisation)
    count, start = 0, time.perf_counter()
    while True:
        c = a @ b
        count += 1
        if count % 4 == 0:
            c.sum().item()  # synchronises a GPU
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2.0 * n**3 * count / elapsed


def quantization_flops(
    layers: list[list[tuple[int, int]]], total_params: int, hidden: int, config: Any
) -> float:
    """Arithmetic of quantizing: ``layers`` holds each block's quantized (in_features, out_features).

    ``total_params`` (the whole model, lm_head included) prices the sanity check's two model passes.
    """
    tokens = config.num_samples * config.seqlen
    passes = 3 if getattr(config, "true_sequential", True) else 2  # Hessians (per group) + outputs
    solves = 2 if config.compare_uniform or config.allocation == "measured" else 1
    flops = 0.0
    for block in layers:
        params = sum(i * o for i, o in block)
        flops += passes * tokens * (2 * params + 4 * config.seqlen * hidden)  # linears + attention
        flops += sum(2 * tokens * i * i for i, _ in block)  # Hessian accumulation
        flops += solves * sum(o * i * i + i**3 for i, o in block)  # GPTQ updates + Cholesky/inverse
        if config.clip_search:
            flops += sum(CLIP_CANDIDATES * CLIP_FLOPS_PER_WEIGHT * i * o for i, o in block)
    if config.budget == "model":
        flops *= 2  # a measuring pass (forward, backward, errors per bitwidth) before the real one
    sanity_tokens = SANITY_WINDOWS * min(config.seqlen, SANITY_SEQLEN)
    return flops + 2 * 2 * total_params * sanity_tokens


def estimate(
    layers: list[list[tuple[int, int]]], total_params: int, hidden: int, config: Any, device: Any
) -> Estimate:
    """The :class:`Estimate` of quantizing with ``config`` on ``device`` (see the module docstring)."""
    flops = quantization_flops(layers, total_params, hidden, config)
    rate = matmul_rate(device)
    return Estimate(OVERHEAD * flops / rate, flops, rate, str(device))
