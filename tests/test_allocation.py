import itertools
import math

import pytest
import torch

from baq_hf import allocation as alloc


def brute_force(c, target, lo, hi):
    n = len(c)
    total = round(target * n)
    best = None
    for r in itertools.product(range(lo, hi + 1), repeat=n):
        if sum(r) != total:
            continue
        loss = sum(cj * 4.0**-rj for cj, rj in zip(c, r, strict=True))
        if best is None or loss < best[0] - 1e-12:
            best = (loss, r)
    return best[0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.5, 1.0, 2.0, 2.25, 3.0])
def test_greedy_is_optimal_against_brute_force(seed, target):
    g = torch.Generator().manual_seed(seed)
    c = torch.exp(4 * torch.randn(5, generator=g, dtype=torch.float64))
    r = alloc.allocate_optimal(c, target, 0, 4)
    assert int(r.sum()) == round(target * 5)
    assert alloc.model_loss(c, r) == pytest.approx(brute_force(c.tolist(), target, 0, 4), rel=1e-12)


@pytest.mark.parametrize("target", [2.0, 2.25, 2.5, 3.0, 4.0])
def test_greedy_hits_budget_and_bounds(target):
    c = torch.exp(3 * torch.randn(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    r = alloc.allocate_optimal(c, target, 1, 6)
    assert r.double().mean().item() == pytest.approx(target, abs=1e-3)
    assert r.min() >= 1 and r.max() <= 6
    uniform = alloc.allocate_uniform(1000, round(target))
    if float(target).is_integer():
        assert alloc.model_loss(c, r) <= alloc.model_loss(c, uniform)


def test_dead_columns_get_min_bits_and_equal_sensitivities_give_uniform():
    c = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    r = alloc.allocate_optimal(c, 2.0, 0, 8)
    assert r[0] == 0 and r[4] == 0 and set(r[[1, 2, 3, 5]].tolist()) == {3}
    flat = alloc.allocate_optimal(torch.ones(8, dtype=torch.float64), 3.0, 0, 8)
    assert flat.tolist() == [3] * 8


def test_relaxed_optimum_satisfies_equal_loss_and_ratio_c():
    c = torch.exp(2 * torch.randn(64, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    r = alloc.relaxed_optimum(c, 3.0)
    assert r.mean().item() == pytest.approx(3.0)
    per_column = c * torch.pow(4.0, -r)
    assert torch.allclose(per_column, per_column[0].expand_as(per_column), rtol=1e-10)
    uniform_loss = float((c * 4.0**-3).sum())
    assert float(per_column.sum()) / uniform_loss == pytest.approx(alloc.ratio_c(c), rel=1e-10)
    gm = math.exp(float(torch.log(c).mean()))
    assert alloc.ratio_c(c) == pytest.approx(gm / float(c.mean()))


def test_paper_rule_tracks_target_and_is_close_to_optimum():
    c = torch.exp(2 * torch.randn(2048, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    paper = alloc.allocate_paper(c, 3.0, 0, 8)
    best = alloc.allocate_optimal(c, 3.0, 0, 8)
    assert abs(paper.double().mean().item() - 3.0) < 0.1
    assert alloc.model_loss(c, best) <= alloc.model_loss(c, paper) * (1 + 1e-9) or paper.sum() > best.sum()


def test_out_of_range_target_is_rejected():
    with pytest.raises(ValueError, match="outside"):
        alloc.allocate_optimal(torch.ones(4, dtype=torch.float64), 9.0, 0, 8)


def brute_force_table(errors, target, lo):
    n, k = errors.shape
    total = round(target * n)
    best = None
    for r in itertools.product(range(k), repeat=n):
        if sum(r) + n * lo != total:
            continue
        loss = sum(float(errors[j, rj]) for j, rj in enumerate(r))
        if best is None or loss < best:
            best = loss
    return best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("target", [1.0, 1.6, 2.0, 2.5, 3.0])
def test_exact_allocation_matches_brute_force_on_non_convex_costs(seed, target):
    g = torch.Generator().manual_seed(seed)
    # decreasing but non-convex per-column curves: the first bit buys almost nothing, as on the real grid
    steps = torch.rand(5, 4, generator=g, dtype=torch.float64) * torch.exp(2 * torch.randn(5, 1, generator=g))
    steps[:, 0] *= 0.02
    errors = torch.cat([steps.sum(1, keepdim=True), steps.sum(1, keepdim=True) - steps.cumsum(1)], 1)
    r = alloc.allocate_exact(errors, target, 0)
    assert int(r.sum()) == round(target * 5)
    assert r.min() >= 0 and r.max() <= 4
    got = float(errors[torch.arange(5), r].sum())
    assert got == pytest.approx(brute_force_table(errors, target, 0), rel=1e-12, abs=1e-15)


def test_exact_allocation_respects_min_bits_and_dead_columns():
    errors = torch.tensor([[8.0, 4.0, 1.0, 0.5], [0.0] * 4, [9.0, 8.9, 0.1, 0.0]], dtype=torch.float64)
    dead = torch.tensor([False, True, False])
    r = alloc.allocate_exact(errors, 2.0, 1, dead)  # bits 1..4, budget 6
    assert r.tolist() == [2, 1, 3]  # 4 + 0.1 beats every other split of 3 extra bits
    full = alloc.allocate_exact(errors, 4.0, 1, dead)  # budget 12: every column at max, dead ones too
    assert full.tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="outside"):
        alloc.allocate_exact(errors, 4.5, 1, dead)
