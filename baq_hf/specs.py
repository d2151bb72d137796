"""Settings and constants shared by the whole flow, at its bottom: no imports from the package.

The user-facing :class:`baq_hf.config.BaqConfig` (on top of the flow) validates against these names, and
the solver, the budget and the format read them, so that neither needs the other to know what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADER_BITS = 4  # bits per column in a packed layer's bitwidth header
MAX_BITS = 2**HEADER_BITS - 1

ALLOCATIONS = ("baq", "grid", "paper", "measured", "uniform")
BUDGETS = ("layer", "model")
WEIGHTINGS = ("fisher", "relative")


@dataclass(frozen=True)
class SolverSpec:
    """What the solver needs to quantize one layer (BaqConfig.solver_spec() builds it)."""

    bits: float
    allocation: str = "baq"
    min_bits: int = 0
    max_bits: int = 8
    group_size: int = -1
    sym: bool = False
    act_order: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    clip_search: bool = False
    compare_uniform: bool = False
