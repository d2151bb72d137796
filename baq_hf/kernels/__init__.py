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


def _offloaded(layer) -> bool:
    """True if accelerate moves this layer's tensors in for each forward (CPU or disk offload)."""
    hook = getattr(layer, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    return any(getattr(h, "offload", False) for h in hooks)


def kernel_layout(layer) -> KernelLayout:
    """The kernel layout of a :class:`baq_hf.linear.BaqLinear`, built on its device on first use.

    The layer keeps it (``set_kernel_layout``), which then holds the codes: the GPU keeps one copy.
    BaqLinear drops it whenever its stored tensors may change (``post_init``, ``load_state_dict``,
    device moves). Layers that accelerate offloads get a layout per call, never kept, so that the
    offloaded weights do not stay on the GPU.
    """
    layout = layer._kernel_layout
    offloaded = _offloaded(layer)
    if layout is None or offloaded or layout.device != layer.perm.device:
        layer.drop_kernel_layout()
        layout = build_layout(
            layer.qweight.to(layer.perm.device),
            layer.bits_header,
            layer.perm,
            layer.range_min,
            layer.range_max,
            layer.group_index,
            layer.out_features,
        )
        _register(layout)
        if not offloaded:
            layer.set_kernel_layout(layout, hold_codes=True)
    elif not torch.compiler.is_compiling() and LAYOUTS.get(layout.op_key) is not layout:
        _register(layout)  # a deep copy of a layer carries its layout with the original's key
    return layout


def _register(layout: KernelLayout) -> None:
    layout.op_key = next(_KEYS)
    LAYOUTS[layout.op_key] = layout


def prepare(model: nn.Module) -> int:
    """Build the kernel layout of every BaqLinear of ``model`` on a CUDA device; returns how many.

    BaqLinear builds its layout on first use anyway; call this after loading and moving the model and
    before ``torch.compile``, so that the host-side building stays out of compiled graphs (loading a
    BAQ checkpoint with ``from_pretrained`` does it for the layers it places on GPUs).
    """
    from ..linear import BaqLinear

    layers = [m for m in model.modules() if isinstance(m, BaqLinear) and m.perm.is_cuda]
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
    ops = _ops(layer.perm.device)
    return ops.tk.dequantize(kernel_layout(layer), dtype)
