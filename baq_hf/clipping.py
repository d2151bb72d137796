"""Quantization ranges: GPTQ's min/max and a Hessian-weighted search of clipped ranges.

At 2-3 bits the min/max range of a row wastes most of its levels on a few outliers. The search tries
shrunken ranges ``[alpha * min, alpha * max]`` (alpha from 1 down to 0.5, GPTQ's ``mse`` mode in spirit)
and keeps, per row, the one whose rounding error is smallest, with each column rounded at its own
bitwidth and its error weighted by the Hessian diagonal (the column's share of the layer's output error).
alpha = 1 is always a candidate, so the search never does worse than min/max on its own score.
"""

from __future__ import annotations

import torch

from . import format as fmt

# 1.0, 0.975, ..., 0.5: the grid of the independent measurement in the issue (21 candidates).
SHRINK_FACTORS = tuple(1.0 - 0.025 * k for k in range(21))


def round_to_grid(
    w: torch.Tensor, bits: torch.Tensor, range_min: torch.Tensor, range_max: torch.Tensor
) -> torch.Tensor:
    """Round ``w`` (M x g) to nearest, column j on its bits[j]-bit grid of the given fp16 ranges.

    The ranges broadcast against ``w`` (M x 1 for one range per row, M x g for one per entry);
    0-bit columns round to 0.
    """
    scale, zero = fmt.grid(range_min, range_max, bits.unsqueeze(0))
    maxq = ((torch.ones_like(bits) << bits) - 1).to(w.dtype)
    live = bits > 0
    safe_scale = torch.where(live, scale, torch.ones_like(scale))
    codes = torch.minimum(torch.clamp(torch.round(w / safe_scale) + zero, min=0.0), maxq)
    return torch.where(live, fmt.dequantize_codes(codes, scale, zero), torch.zeros_like(w))


def weighted_rounding_error(
    w: torch.Tensor,
    bits: torch.Tensor,
    weight: torch.Tensor,
    range_min: torch.Tensor,
    range_max: torch.Tensor,
) -> torch.Tensor:
    """Per row: sum_j weight_j (w_ij - q_ij)^2 with column j rounded at bits[j] on the row's range.

    ``w`` is M x g, ``bits`` and ``weight`` have g entries, the fp16 ranges have M entries (one per row).
    """
    q = round_to_grid(w, bits, range_min.unsqueeze(1), range_max.unsqueeze(1))
    return ((w - q) ** 2 * weight).sum(dim=1)


def fit_ranges(
    w: torch.Tensor, bits: torch.Tensor, weight: torch.Tensor, sym: bool, search: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp16 (min, max) per row of ``w`` (M x g): min/max, or the best clipped range if ``search``;
    and each row's weighted rounding error on the ranges returned."""
    mn0, mx0 = fmt.fit_range(w, sym)
    bits = bits.to(w.device)
    weight = weight.to(w.device, torch.float32)
    best_mn, best_mx = mn0.clone(), mx0.clone()
    best_err = weighted_rounding_error(w, bits, weight, mn0, mx0)
    if not search:
        return best_mn, best_mx, best_err
    for alpha in SHRINK_FACTORS[1:]:
        mn = (mn0.float() * alpha).half()
        mx = (mx0.float() * alpha).half()
        valid = mx > mn  # fp16 underflow can collapse a tiny range: such a candidate is skipped
        err = weighted_rounding_error(w, bits, weight, mn, mx)
        better = valid & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_mn = torch.where(better, mn, best_mn)
        best_mx = torch.where(better, mx, best_mx)
    return best_mn, best_mx, best_err
