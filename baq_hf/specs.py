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
ROTATIONS = ("hadamard",)  # or None: quantize the weights in their own basis


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
    rotation: str | None = None  # "hadamard": a randomized Hadamard transform of the inputs (rotation.py)
    rotation_block: int | None = None  # None: one transform over all inputs; else blocks of at most this
    seed: int = 0  # with the layer's name, the rotation's random signs
