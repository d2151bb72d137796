"""Tensor-parallel slices of one packed weight, re-packed exactly from its stored codes.

Engines that split a layer across ranks (vLLM's column- and row-parallel linears) need each rank's part
as a weight of its own. A slice of output rows keeps every column's bitwidth and order; a slice of input
columns keeps the stored columns whose ``perm`` falls in the range, in their stored (bitwidth-sorted)
order, so the header stays sorted. Either way the codes are unpacked and packed again with the format's
own functions: no dequantization; the slice dequantizes bit for bit to the same slice of the weight.
The bias is not part of a :class:`~baq_hf.format.BaqWeight`: an engine slices it like any dense tensor.
"""

from __future__ import annotations

import torch

from . import format as fmt


def _codes(weight: fmt.BaqWeight) -> torch.Tensor:
    """All codes (int64, M x N) in storage order."""
    return fmt.unpack_codes(weight.qweight.cpu(), weight.segments, weight.out_features)


def select_rows(weight: fmt.BaqWeight, start: int, stop: int) -> fmt.BaqWeight:
    """The weight of output rows ``start:stop`` (a column-parallel rank's part), on the CPU."""
    m = weight.out_features
    if not 0 <= start < stop <= m:
        raise ValueError(f"rows {start}:{stop} are outside the layer's {m} output rows")
    tensors = {k: v.cpu() for k, v in weight.tensors.items()}
    tensors["weight"] = fmt.pack_codes(_codes(weight)[start:stop], weight.stored_bits)
    tensors["range_min"] = tensors["range_min"][start:stop].clone()
    tensors["range_max"] = tensors["range_max"][start:stop].clone()
    return fmt.BaqWeight(stop - start, tensors)


def select_columns(weight: fmt.BaqWeight, start: int, stop: int) -> fmt.BaqWeight:
    """The weight reading input columns ``start:stop`` only (a row-parallel rank's part), on the CPU.

    With groups, only the range groups that the kept columns use are kept (renumbered in order). The
    format derives the group width from the number of groups, so when the kept groups do not divide
    the kept columns evenly (possible with ``act_order``), unused copies of the last group pad the
    ranges to the next count that does; they are never read. A slice within one group is stored
    ungrouped (no ``group_index``), as the format requires of a single range per row.
    """
    n = weight.in_features
    if not 0 <= start < stop <= n:
        raise ValueError(f"columns {start}:{stop} are outside the layer's {n} input columns")
    if weight.rotation is not None:
        raise ValueError(
            "a layer quantized with an input rotation (rotation_signs) mixes all its input columns and "
            "cannot be split by columns (row-parallel); serve it without tensor parallelism"
        )
    perm = weight.perm.long().cpu()
    keep = (perm >= start) & (perm < stop)  # stored order, so the kept bitwidths stay sorted
    kept_bits = weight.stored_bits[keep]
    tensors = {k: v.cpu() for k, v in weight.tensors.items()}
    tensors["weight"] = fmt.pack_codes(_codes(weight)[:, keep], kept_bits)
    tensors[fmt.HEADER_TENSOR] = fmt.pack_header(kept_bits)
    tensors["perm"] = (perm[keep] - start).to(torch.int32)
    if weight.group_index is not None:
        groups = weight.group_index.long().cpu()[keep]
        used = torch.unique(groups)  # sorted
        width = stop - start
        count = next(c for c in range(used.numel(), width + 1) if width % c == 0)
        pick = torch.cat([used, used[-1:].expand(count - used.numel())])
        tensors["group_index"] = torch.searchsorted(used, groups).to(torch.int32)
        if count == 1:  # one range per row: the format's ungrouped layout
            del tensors["group_index"]
        tensors["range_min"] = tensors["range_min"][:, pick].clone()
        tensors["range_max"] = tensors["range_max"][:, pick].clone()
    return fmt.BaqWeight(weight.out_features, tensors)
