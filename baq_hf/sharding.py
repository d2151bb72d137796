"""Tensor-parallel slices of one packed layer, re-packed exactly from its stored codes.

Engines that split a layer across ranks (vLLM's column- and row-parallel linears) need each rank's part
as a layer of its own. A slice of output rows keeps every column's bitwidth and order; a slice of input
columns keeps the stored columns whose ``perm`` falls in the range, in their stored (bitwidth-sorted)
order, so the header stays sorted. Either way the codes are unpacked and packed again with the format's
own functions: no dequantization, the slice dequantizes bit for bit to the same slice of the weight.

Tensors are the stored ones of :mod:`baq_hf.format` (``weight`` = the packed codes), the bias aside
(an engine slices it like any dense tensor).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import format as fmt


def _unpacked(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored bitwidths, codes M x N in storage order) of a layer's stored tensors."""
    n = tensors["perm"].numel()
    m = tensors["range_min"].shape[0]
    bits = fmt.unpack_header(tensors[fmt.HEADER_TENSOR].cpu(), n)
    codes = fmt.unpack_codes(tensors["weight"].cpu(), fmt.segments_from_bits(bits, m), m)
    return bits, codes


def select_rows(tensors: Mapping[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """The layer computing output rows ``start:stop`` (a column-parallel rank's part)."""
    m = tensors["range_min"].shape[0]
    if not 0 <= start < stop <= m:
        raise ValueError(f"rows {start}:{stop} are outside the layer's {m} output rows")
    bits, codes = _unpacked(tensors)
    out = dict(tensors)
    out["weight"] = fmt.pack_codes(codes[start:stop], bits)
    out["range_min"] = tensors["range_min"][start:stop].clone()
    out["range_max"] = tensors["range_max"][start:stop].clone()
    return out


def select_columns(tensors: Mapping[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """The layer reading input columns ``start:stop`` only (a row-parallel rank's part).

    With groups, only the range groups that the kept columns use are kept (renumbered in order). The
    format derives the group width from the number of groups, so when the kept groups do not divide
    the kept columns evenly (possible with ``act_order``), unused copies of the last group pad the
    ranges to the next count that does; they are never read. A slice within one group is stored
    ungrouped (no ``group_index``), as the format requires of a single range per row.
    """
    perm = tensors["perm"].long().cpu()
    n = perm.numel()
    if not 0 <= start < stop <= n:
        raise ValueError(f"columns {start}:{stop} are outside the layer's {n} input columns")
    bits, codes = _unpacked(tensors)
    keep = (perm >= start) & (perm < stop)  # stored order, so the kept bitwidths stay sorted
    kept_bits = bits[keep]
    out = dict(tensors)
    out["weight"] = fmt.pack_codes(codes[:, keep], kept_bits)
    out[fmt.HEADER_TENSOR] = fmt.pack_header(kept_bits)
    out["perm"] = (perm[keep] - start).to(torch.int32)
    if "group_index" in tensors:
        groups = tensors["group_index"].long().cpu()[keep]
        used = torch.unique(groups)  # sorted
        width = stop - start
        count = next(c for c in range(used.numel(), width + 1) if width % c == 0)
        pick = torch.cat([used, used[-1:].expand(count - used.numel())])
        out["group_index"] = torch.searchsorted(used, groups).to(torch.int32)
        if count == 1:  # one range per row: the format's ungrouped layout
            del out["group_index"]
        out["range_min"] = tensors["range_min"][:, pick.to(tensors["range_min"].device)].clone()
        out["range_max"] = tensors["range_max"][:, pick.to(tensors["range_max"].device)].clone()
    return out
