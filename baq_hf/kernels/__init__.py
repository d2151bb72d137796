"""CUDA compute for BaqLinear: Triton kernels behind a small dispatch layer.

Triton is imported only when a kernel is first called, so ``import baq_hf.kernels`` works on machines
without triton or without a GPU; calling a kernel there raises a RuntimeError saying what is missing.
The kernels also run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
import torch.nn.functional as F

__all__ = ["FUSED_FORWARD_ROWS", "baq_linear_forward", "dequantize_triton"]

# Up to this many rows of x, forward uses the fused GEMV; above, dequantize + matmul. Measured on an
# H100 (docs/results/kernels.md): at one row the word-level GEMV beats dequantize + matmul on the
# Llama-2-7B shapes (39 vs 56 us at 2 bits, 4096x4096), but at 8 rows the per-code kernel is 4-5x
# slower than dequantize + matmul (251 vs 56 us), so batches of 2-16 rows take the dequantize path.
FUSED_FORWARD_ROWS = 1


def _kernels(device: torch.device) -> ModuleType:
    """The triton_kernels module, or a RuntimeError that says why it cannot run on ``device``."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"BAQ Triton kernels need CUDA tensors, got a tensor on {device}. On CPU, BaqLinear uses its "
            "torch path; to run the kernels on CPU anyway, set TRITON_INTERPRET=1 before importing triton."
        )
    try:
        from . import triton_kernels
    except ImportError as exc:
        raise RuntimeError(
            f"BAQ Triton kernels could not be loaded ({exc}); install triton (`pip install triton`) or set "
            "BAQ_HF_FORCE_TORCH=1 to use the torch dequantize-then-matmul path."
        ) from exc
    return triton_kernels


def baq_linear_forward(x: torch.Tensor, layer) -> torch.Tensor:
    """``layer(x)`` for a :class:`baq_hf.linear.BaqLinear`: fused GEMV for one row, else dequant + matmul.

    Returns a tensor of x's dtype and shape (last dimension ``out_features``). Inference only: no autograd.
    """
    tk = _kernels(x.device)
    n, m = layer.in_features, layer.out_features
    if x.shape[-1] != n:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {n}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    if x2.shape[0] <= FUSED_FORWARD_ROWS:
        y = tk.fused_linear(x2, layer)
    else:
        # columns in storage order: coalesced stores in the dequantizer, x permuted once instead
        w = tk.dequantize(layer, x.dtype, stored_order=True)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        y = F.linear(x2.index_select(1, layer.perm), w, bias)
    return y.reshape(*lead, m)


def dequantize_triton(layer, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Dense weight (out x in, original column order) of a BaqLinear, computed by the Triton kernel.

    Equals ``layer.dequantize().to(dtype)`` bit for bit, for dtype fp16, bf16 or fp32.
    """
    return _kernels(layer.qweight.device).dequantize(layer, dtype)
