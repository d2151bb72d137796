"""CUDA compute for BaqLinear: a kernel layout built at load time, Triton kernels over it, a torch op.

- :mod:`.layout`: the stored codes rearranged for the kernels (and back), plain torch.
- :mod:`.triton_kernels`: the GEMV, the tile kernel (2-16 rows) and the dequantizer.
- :mod:`.ops`: the forward's dispatch and ``torch.ops.baq_hf.linear`` (torch.compile, CUDA graphs).
- :mod:`.configs`: launch configurations, tuned tables per GPU and the fallback.

Triton is imported only when a kernel is first called, so ``import baq_hf.kernels`` works on machines
without triton or without a GPU; calling a kernel there raises a RuntimeError saying what is missing.
The kernels also run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import itertools
import os
import weakref
from types import ModuleType

import torch
from torch import nn

from .layout import KernelLayout, build_layout

__all__ = ["baq_linear_forward", "dequantize_triton", "kernel_layout", "prepare"]

# layouts by the int key that torch.ops.baq_hf.linear receives (held weakly: each layer owns its layout)
LAYOUTS: weakref.WeakValueDictionary[int, KernelLayout] = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


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


def kernel_layout(layer) -> KernelLayout:
    """The kernel layout of a :class:`baq_hf.linear.BaqLinear`, built on its device on first use.

    BaqLinear drops it (``_kernel_layout = None``) whenever its stored tensors may change: new header
    (``post_init``), ``load_state_dict`` and device moves; it is then rebuilt here.
    """
    layout = getattr(layer, "_kernel_layout", None)
    if layout is None or layout.device != layer.qweight.device:
        q = layer.qweight
        layout = build_layout(
            q,
            layer.bits_header,
            layer.perm,
            layer.range_min,
            layer.range_max,
            layer.group_index,
            layer.out_features,
        )
        layout.op_key = next(_KEYS)
        LAYOUTS[layout.op_key] = layout
        layer._kernel_layout = layout
    return layout


def prepare(model: nn.Module) -> int:
    """Build the kernel layout of every BaqLinear in ``model`` now (on their devices); returns how many.

    Call it after loading and moving the model, before ``torch.compile``: layouts are built with
    host-side code that a compiled graph should not contain.
    """
    from ..linear import BaqLinear

    layers = [m for m in model.modules() if isinstance(m, BaqLinear)]
    for layer in layers:
        kernel_layout(layer)
    return len(layers)


def baq_linear_forward(x: torch.Tensor, layer) -> torch.Tensor:
    """``layer(x)`` for a BaqLinear on CUDA: one allocation and one kernel launch for up to 16 rows.

    Under ``torch.compile`` this goes through ``torch.ops.baq_hf.linear``; in eager mode it calls the
    implementation directly (no dispatcher overhead). Inference only: no autograd.
    """
    ops = _ops(x.device)
    layout = kernel_layout(layer)
    if torch.compiler.is_compiling():
        return torch.ops.baq_hf.linear(x, layer.bias, layout.op_key)
    return ops.linear(x, layout, layer.bias)


def dequantize_triton(layer, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Dense weight (out x in, original column order) of a BaqLinear, computed by the Triton kernel.

    Equals ``layer.dequantize().to(dtype)`` bit for bit, for dtype fp16, bf16 or fp32.
    """
    ops = _ops(layer.qweight.device)
    return ops.tk.dequantize(kernel_layout(layer), dtype)
