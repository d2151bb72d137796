"""CUDA compute for packed BAQ weights: a kernel layout built at load, Triton kernels over it, a torch op.

- :mod:`.layout`: the stored codes rearranged for the kernels (and back), plain torch.
- :mod:`.triton_kernels`: the GEMV, the tile kernel (2-16 rows) and the dequantizer.
- :mod:`.ops`: the forward's dispatch and ``torch.ops.baq_hf.linear`` (torch.compile, CUDA graphs,
  autograd to the input).
- :mod:`.configs`: launch configurations, tuned tables per GPU and the fallback.

Kernels take tensors (a :class:`~.layout.KernelLayout` built from a :class:`baq_hf.format.BaqWeight`),
never a module: ``BaqLinear`` builds and caches its layout and calls :func:`linear`.

Triton is imported only when a kernel is first called, so ``import baq_hf.kernels`` works on machines
without triton or without a GPU; calling a kernel there raises a RuntimeError saying what is missing.
The kernels also run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from .layout import KernelLayout, build_layout

__all__ = ["KernelLayout", "build_layout", "dequantize", "linear"]


def _ops(device: torch.device) -> ModuleType:
    """The ops module (which imports triton), or a RuntimeError that says why it cannot run on ``device``."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"BAQ Triton kernels need CUDA tensors, got a tensor on {device}. On CPU, BaqLinear uses its "
            "torch path; to run the kernels on CPU anyway, set TRITON_INTERPRET=1 before importing triton."
        )
    try:
        from . import ops
    except ImportError as exc:
        raise RuntimeError(
            f"BAQ Triton kernels could not be loaded ({exc}); install triton (`pip install triton`) or set "
            "BAQ_HF_FORCE_TORCH=1 to use the torch dequantize-then-matmul path."
        ) from exc
    return ops


def linear(x: torch.Tensor, layout: KernelLayout, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` over a kernel layout: one allocation and one kernel launch for up to 16 rows.

    Under ``torch.compile``, and when x or the bias needs a gradient, this goes through
    ``torch.ops.baq_hf.linear`` (whose autograd is ``grad @ W``, W from the Triton dequantizer); else it
    calls the implementation directly (no dispatcher overhead).
    """
    ops = _ops(x.device)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad or torch.compiler.is_compiling():
        return torch.ops.baq_hf.linear(x, bias, layout.op_key)
    return ops.linear(x, layout, bias)


def dequantize(layout: KernelLayout, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Dense weight (out x in, original column order) computed by the Triton kernel.

    Equals ``BaqWeight.dequantize().to(dtype)`` bit for bit, for dtype fp16, bf16 or fp32.
    """
    return _ops(layout.device).tk.dequantize(layout, dtype)
