"""How long a quantization will take here, said before it starts (the defaults take hours on a CPU).

The estimate counts the arithmetic of the calibration from the model's layer shapes and the settings
(the block forward passes over the calibration tokens, the Hessians, the GPTQ solves, the clip search
and the sanity check), divides it by the rate of a float32 matmul measured on the device just now (a
loaded machine gives a longer estimate) and multiplies by :data:`OVERHEAD`, the ratio of measured
wall time to that matmul-rate time, fitted on runs of the embedded SmolLM2-135M on a 2-core x86_64 CPU
(see the constant). It is a rough guide: within a factor of about 2 on the runs it was checked on,
and low when other jobs start during the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# Fitted on SmolLM2-135M, shared 2-core x86_64 CPU, 1 thread, `baq-hf quantize --bits 3`, its "quantized
# in" time against the estimate it printed (load average during the run in brackets):
#   --num-samples 4 --seqlen 256 (per row):                   80 s measured, 125 s estimated (2.8)
#   --num-samples 8 --seqlen 512 --group-size 64 --clip-search: 398 s measured, 270 s estimated (3 -> 6)
#   the README command with BAQ_HF_QUICK_TEST=1 (2 x 64 tokens): 190 s measured, 190 s estimated (5.5)
# OVERHEAD: wall time over matmul-rate time of the counted matmul work (the first run, before the rest)
OVERHEAD = 3.0
# elementwise work, in matmul-FLOP equivalents, fitted on the third run: the clip search per quantized
# weight, and a CPU forward pass of a BAQ layer per weight (it unpacks its weight at every pass)
CLIP_FLOPS_PER_WEIGHT = 16000
CPU_UNPACK_FLOPS_PER_WEIGHT = 1800
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
            f"({self.flops / 1e12:.2f} TFLOP-equivalents of block passes, Hessians, GPTQ solves, clip "
            f"search and sanity check at {self.rate / 1e9:.1f} GFLOP/s measured now, x{OVERHEAD:g}; "
            "a rough guide, see baq_hf/estimate.py)"
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
    layers: list[list[tuple[int, int]]], total_params: int, hidden: int, config: Any, cpu: bool = True
) -> float:
    """Arithmetic of quantizing: ``layers`` holds each block's quantized (in_features, out_features).

    ``total_params`` (the whole model, lm_head included) prices the sanity check's two model passes;
    ``cpu``: the quantized model's pass unpacks its layers (the GPU kernels do not count here).
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
            flops += sum(CLIP_FLOPS_PER_WEIGHT * i * o for i, o in block)
    if config.budget == "model":
        flops *= 2  # a measuring pass (forward, backward, errors per bitwidth) before the real one
    sanity_tokens = SANITY_WINDOWS * min(config.seqlen, SANITY_SEQLEN)
    flops += 2 * 2 * total_params * sanity_tokens  # the float and the quantized model
    if cpu:  # the quantized model's sanity passes unpack every layer once per window
        flops += SANITY_WINDOWS * CPU_UNPACK_FLOPS_PER_WEIGHT * sum(i * o for b in layers for i, o in b)
    return flops


def estimate(
    layers: list[list[tuple[int, int]]], total_params: int, hidden: int, config: Any, device: Any
) -> Estimate:
    """The :class:`Estimate` of quantizing with ``config`` on ``device`` (see the module docstring)."""
    flops = quantization_flops(layers, total_params, hidden, config, cpu=device.type == "cpu")
    rate = matmul_rate(device)
    return Estimate(OVERHEAD * flops / rate, flops, rate, str(device))
