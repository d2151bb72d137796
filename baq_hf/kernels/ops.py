"""BaqLinear's CUDA forward over the kernel layout, and its ``torch.library`` op for compile and graphs.

:func:`linear` picks the kernel by the number of rows of x (see :func:`configs.choose`: the GEMV for
one row of a per-row layer, the tile kernel for 1-16 rows, unless a tuned table says otherwise), and
above 16 rows dequantizes W^T (coalesced writes) for one matmul. It allocates y and
launches one kernel. ``torch.ops.baq_hf.linear`` wraps it as an opaque custom op with a fake
implementation, so that ``torch.compile`` traces a model through BaqLinear without graph breaks and
CUDA graphs capture it; the op finds the layout by its key in ``baq_hf.kernels.layout.LAYOUTS`` (an int),
since the op's arguments can only be tensors and scalars. In eager mode :func:`baq_hf.kernels.linear` calls
:func:`linear` directly and skips the dispatcher.
"""

from __future__ import annotations

import torch

from . import configs
from . import triton_kernels as tk
from .layout import LAYOUTS, KernelLayout


def _config(layout: KernelLayout, rows: int, dtype: torch.dtype) -> configs.KernelConfig:
    """The kernel and launch config for this many rows (cached on the layout: one dict look-up per call)."""
    key = (configs.batch_bucket(rows), dtype)
    cfg = layout.launch_configs.get(key)
    if cfg is None:
        gemv_ok = not layout.grouped and layout.zero_fold_exact
        cfg = configs.choose(
            layout.device,
            layout.out_features,
            layout.in_features,
            layout.max_bits,
            rows,
            dtype,
            layout.grouped,
            gemv_ok,
        )
        layout.launch_configs[key] = cfg
    return cfg


def linear(x: torch.Tensor, layout: KernelLayout, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b (x's dtype, last dimension ``out_features``), no autograd (the op has it)."""
    n, m = layout.in_features, layout.out_features
    if x.shape[-1] != n:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {n}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # the torch path rounds the bias to the activation dtype too
    rows = x2.shape[0]
    if rows <= tk.MAX_TILE_ROWS:
        cfg = _config(layout, max(rows, 1), x.dtype)
        launch = tk.gemv if cfg.kernel == "gemv" else tk.tile_matmul
        y = launch(x2, layout, bias, **cfg.launch_args())
    else:
        wt = tk.dequantize(layout, x.dtype, transposed=True)
        y = x2 @ wt if bias is None else torch.addmm(bias, x2, wt)
    return y.reshape(*lead, m)


@torch.library.custom_op("baq_hf::linear", mutates_args=())
def linear_op(x: torch.Tensor, bias: torch.Tensor | None, layout_key: int) -> torch.Tensor:
    """``torch.ops.baq_hf.linear``: :func:`linear` with the layout registered under ``layout_key``.

    The kernels' workspace is private and all zeros again when the op returns, so the op is pure.
    """
    return linear(x, LAYOUTS[layout_key], bias)


@linear_op.register_fake
def _linear_fake(x: torch.Tensor, bias: torch.Tensor | None, layout_key: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], LAYOUTS[layout_key].out_features)


@torch.library.custom_op("baq_hf::dequantize", mutates_args=())
def dequantize_op(layout_key: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.ops.baq_hf.dequantize``: W (out x in) of the layout under ``layout_key`` (the backward of
    ``baq_hf::linear``, opaque to compile like the forward)."""
    return tk.dequantize(LAYOUTS[layout_key], dtype)


@dequantize_op.register_fake
def _dequantize_fake(layout_key: int, dtype: torch.dtype) -> torch.Tensor:
    layout = LAYOUTS[layout_key]
    return torch.empty(layout.out_features, layout.in_features, dtype=dtype, device=layout.device)


def _linear_setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, bias, layout_key = inputs
    ctx.layout = LAYOUTS[layout_key]  # kept alive for the backward (LAYOUTS holds layouts weakly)
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    """``grad @ W`` with W from the Triton dequantizer (a temporary: nothing of W is kept between the
    passes); no gradient into the packed tensors, which are not inputs of the op."""
    layout = ctx.layout
    g2 = grad.reshape(-1, layout.out_features)
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = torch.ops.baq_hf.dequantize(layout.op_key, g2.dtype)
        grad_x = (g2 @ w).to(ctx.x_dtype).reshape(ctx.x_shape)
    if ctx.needs_input_grad[1]:
        grad_bias = g2.float().sum(0).to(ctx.bias_dtype)
    return grad_x, grad_bias, None


linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)
