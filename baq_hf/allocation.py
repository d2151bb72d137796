"""Per-column bit allocation: BAQ's loss model sum_j C_j 2^(-2 R_j) and the rules that minimise it.

All functions take sensitivities C (N,) and return integer bitwidths R (N,) as int64 tensors.
Columns with C_j = 0 (dead inputs) carry no loss at any bitwidth and are given min_bits.
"""

from __future__ import annotations

import itertools
import math

import torch


def sensitivities(range_sq_sum: torch.Tensor, hinv_diag: torch.Tensor, dead: torch.Tensor | None = None):
    """Paper eq. 10: C_j = sum_i range_i(j)^2 / (12 d_j^2), d_j = U[j, j] of chol(H^-1).

    ``range_sq_sum[j]`` is sum over rows of the squared quantization range that applies to column j.
    """
    c = range_sq_sum.double() / (12.0 * hinv_diag.double() ** 2)
    if dead is not None:
        c = torch.where(dead, torch.zeros_like(c), c)
    return c


def budget(n_cols: int, target_bits: float) -> int:
    """Total code bits of a layer: the target mean times the column count, rounded to an integer."""
    return round(target_bits * n_cols)


def _bits_above_floor(total: int, units: int, target_bits: float, min_bits: int, max_bits: int) -> int:
    """Bits to give above min_bits per unit (column, or weight), or an error if the target is out of range."""
    extra = total - units * min_bits
    if not 0 <= extra <= units * (max_bits - min_bits):
        raise ValueError(
            f"target {target_bits} bits is outside [min_bits, max_bits] = [{min_bits}, {max_bits}]"
        )
    return extra


def allocate_optimal(c: torch.Tensor, target_bits: float, min_bits: int, max_bits: int) -> torch.Tensor:
    """Exact integer optimum of sum_j C_j 4^-R_j s.t. sum_j R_j = budget, min_bits <= R_j <= max_bits.

    The problem is separable and convex: the marginal gain of a column's next bit, 3/4 C_j 4^-r,
    shrinks with r, so giving bits to the largest gains first (a greedy, here done in one stable sort
    of all gains) is optimal and hits the budget exactly.
    """
    n = c.numel()
    extra = _bits_above_floor(budget(n, target_bits), n, target_bits, min_bits, max_bits)
    steps = torch.arange(min_bits, max_bits, dtype=torch.float64)
    gains = 0.75 * c.double().unsqueeze(1) * torch.pow(4.0, -steps).unsqueeze(0)  # N x (max - min)
    order = torch.sort(gains.reshape(-1), descending=True, stable=True).indices[:extra]
    counts = torch.bincount(order // (max_bits - min_bits), minlength=n) if extra else torch.zeros(n)
    return (min_bits + counts).to(torch.int64)


def allocate_exact(
    errors: torch.Tensor, target_bits: float, min_bits: int, dead: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact integer optimum of sum_j errors[j, R_j - min_bits] s.t. sum_j R_j = budget.

    ``errors`` is N x K: column j's loss at min_bits + r bits. Measured rounding errors are not convex
    in R (the first bit of a column buys almost nothing), so a greedy on marginal gains is not exact;
    this is a dynamic program over (columns, bits spent), O(N x budget x K), which is. Dead columns
    (no loss at any width) get min_bits unless the budget cannot be spent on the live ones.
    """
    n, k = errors.shape
    extra = _bits_above_floor(budget(n, target_bits), n, target_bits, min_bits, min_bits + k - 1)
    dead = torch.zeros(n, dtype=torch.bool) if dead is None else dead.cpu().bool()
    live = torch.nonzero(~dead).flatten()
    cost = errors.cpu().double()[live]
    spend = min(extra, live.numel() * (k - 1))
    best = torch.full((spend + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    choice = torch.empty(live.numel(), spend + 1, dtype=torch.uint8)
    pad = torch.full((k - 1,), math.inf, dtype=torch.float64)
    for j in range(live.numel()):
        # window b holds best[b - (k-1) .. b]: spending r more bits on column j comes from best[b - r]
        candidates = torch.cat([pad, best]).unfold(0, k, 1) + cost[j].flip(0)
        best, index = candidates.min(dim=1)
        choice[j] = (k - 1 - index).to(torch.uint8)
    bits = torch.full((n,), min_bits, dtype=torch.int64)
    left = spend
    for j in range(live.numel() - 1, -1, -1):
        r = int(choice[j, left])
        bits[live[j]] += r
        left -= r
    leftover = extra - spend  # only when every live column is full: give the rest to dead columns
    for j in torch.nonzero(dead).flatten().tolist():
        add = min(leftover, k - 1)
        bits[j] += add
        leftover -= add
    return bits


def allocate_across_layers(
    tables: list[torch.Tensor], weights: list[float], rows: list[int], target_bits: float, min_bits: int
) -> list[int]:
    """One bit budget for many layers: code bits per layer (sum over its columns) for a model-wide mean.

    Minimises sum_l weights[l] sum_j tables[l][j, R_j - min_bits] subject to
    sum_l rows[l] sum_j R_j <= round(target_bits x sum_l rows[l] N_l): a column's bit costs its rows.
    A Lagrange multiplier mu, bisected, prices a stored bit; every column takes its cheapest width at
    that price, which is optimal for the total it spends (Everett). The gap to the budget left by the
    last price step is filled greedily by the best gain per stored bit that fits.
    """
    cost = torch.cat([t.cpu().double() * w for t, w in zip(tables, weights, strict=True)])
    col_rows = torch.cat([torch.full((t.shape[0],), float(r)) for t, r in zip(tables, rows, strict=True)])
    col_rows = col_rows.double()
    k = cost.shape[1]
    steps = torch.arange(k, dtype=torch.float64)
    units = int(col_rows.sum())  # weights in all layers
    extra = _bits_above_floor(round(target_bits * units), units, target_bits, min_bits, min_bits + k - 1)

    def choose(mu: float) -> torch.Tensor:
        return torch.argmin(cost + mu * col_rows.unsqueeze(1) * steps, dim=1)

    def spent(r: torch.Tensor) -> int:
        return int((col_rows * r).sum())

    lo, hi = 0.0, float(((cost[:, 0] - cost.min(dim=1).values) / col_rows).max()) + 1.0
    for _ in range(200):  # spent(choose(mu)) falls as mu rises: the smallest mu that fits the budget
        mid = 0.5 * (lo + hi)
        if spent(choose(mid)) <= extra:
            hi = mid
        else:
            lo = mid
    r = choose(hi)
    gap = extra - spent(r)
    while gap > 0:
        current = cost.gather(1, r.unsqueeze(1))
        more = steps.unsqueeze(0) - r.unsqueeze(1).double()
        fits = (more > 0) & (more * col_rows.unsqueeze(1) <= gap)
        gain = torch.where(fits, (current - cost) / (more * col_rows.unsqueeze(1)), -math.inf)
        best = int(torch.argmax(gain.max(dim=1).values))
        if not math.isfinite(float(gain[best].max())):
            break
        step = int(torch.argmax(gain[best]))
        gap -= int(col_rows[best]) * (step - int(r[best]))
        r[best] = step
    bounds = torch.cumsum(torch.tensor([0] + [t.shape[0] for t in tables]), 0).tolist()
    return [int(r[a:b].sum()) + min_bits * (b - a) for a, b in itertools.pairwise(bounds)]


def _round_to_reference_loss(c: torch.Tensor, l_ref: float, min_bits: int, max_bits: int) -> torch.Tensor:
    """Paper Alg. 1: R_j = max(0, round(0.5 log2(C_j / L_ref))), clamped to the bounds."""
    r = torch.full_like(c, float(min_bits))
    pos = c > 0
    r[pos] = torch.round(0.5 * torch.log2(c[pos] / l_ref))
    return r.clamp(min_bits, max_bits).to(torch.int64)


def allocate_paper(c: torch.Tensor, target_bits: float, min_bits: int, max_bits: int) -> torch.Tensor:
    """Paper Alg. 1-2: one L_ref correction step from L_init = GM(C) 4^-R_ref (the relaxed optimum's
    equal loss), then rounding. The mean bitwidth only approximates the target."""
    c = c.double()
    pos = c > 0
    if not bool(pos.any()):
        return torch.full_like(c, min_bits, dtype=torch.int64)
    l_init = math.exp(float(torch.log(c[pos]).mean())) * 4.0**-target_bits
    r_init = float(_round_to_reference_loss(c, l_init, min_bits, max_bits).double().mean())
    l_ref = l_init * 2.0 ** (2.0 * (r_init - target_bits))
    return _round_to_reference_loss(c, l_ref, min_bits, max_bits)


def allocate_uniform(n_cols: int, bits: float) -> torch.Tensor:
    return torch.full((n_cols,), int(bits), dtype=torch.int64)


def relaxed_optimum(c: torch.Tensor, target_bits: float) -> torch.Tensor:
    """Paper eq. 6/18: real-valued R_j = R_ref + 0.5 log2(C_j / GM(C)) over columns with C_j > 0."""
    c = c.double()
    gm = torch.exp(torch.log(c).mean())
    return target_bits + 0.5 * torch.log2(c / gm)


def model_loss(c: torch.Tensor, bits: torch.Tensor) -> float:
    """The loss model sum_j C_j 4^-R_j."""
    return float((c.double() * torch.pow(4.0, -bits.double())).sum())


def ratio_c(c: torch.Tensor) -> float:
    """Paper eq. 9: GM(C) / AM(C) over live columns, the relaxed BAQ-to-uniform loss ratio."""
    c = c.double()
    c = c[c > 0]
    if c.numel() == 0:
        return 1.0
    return float(torch.exp(torch.log(c).mean()) / c.mean())


def allocate(method: str, c: torch.Tensor, target_bits: float, min_bits: int, max_bits: int) -> torch.Tensor:
    """Dispatch on the rules driven by C ("measured" passes C from measured losses; "grid" needs the
    per-bitwidth error table and goes through :func:`allocate_exact`)."""
    if method in ("baq", "measured"):
        return allocate_optimal(c, target_bits, min_bits, max_bits)
    if method == "paper":
        return allocate_paper(c, target_bits, min_bits, max_bits)
    if method == "uniform":
        return allocate_uniform(c.numel(), target_bits)
    raise ValueError(f"unknown allocation {method!r}")
