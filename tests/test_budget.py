"""budget="model": one bit budget over all layers, its exact total, and the saved measurement."""

import itertools

import pytest
import torch

from baq_hf import BaqConfig, BaqLinear
from baq_hf import allocation as alloc
from baq_hf.calibration import quantize_model

from .conftest import SEQLEN, calibration_ids, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def convex_table(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(2 * torch.randn(n, 1, generator=g, dtype=torch.float64))
    return scale * torch.pow(4.0, -torch.arange(k, dtype=torch.float64)) * (1 + torch.rand(n, 1, generator=g))


@pytest.mark.parametrize("seed", range(5))
def test_model_budget_is_optimal_on_convex_costs_with_equal_rows(seed):
    tables = [convex_table(3, 4, seed), convex_table(2, 4, seed + 10)]
    weights = [1.0, 3.0]
    cost = torch.cat([w * t for w, t in zip(weights, tables, strict=True)])  # 5 columns x 4 widths
    got = alloc.allocate_across_layers(tables, weights, [1, 1], 2.0, 0)
    assert sum(got) == 10
    best = min(
        sum(float(cost[j, r[j]]) for j in range(5))
        for r in itertools.product(range(4), repeat=5)
        if sum(r) == 10
    )
    # each layer's share, re-solved inside the layer, reaches the brute-force optimum
    per_layer = [alloc.allocate_exact(t, b / t.shape[0], 0) for t, b in zip(tables, got, strict=True)]
    total = sum(
        w * float(t[torch.arange(len(r)), r].sum())
        for w, t, r in zip(weights, tables, per_layer, strict=True)
    )
    assert total == pytest.approx(best, rel=1e-12)


def test_model_budget_moves_bits_to_the_layer_whose_error_costs_more():
    table = convex_table(8, 9, 0)
    cheap, dear = alloc.allocate_across_layers([table, table.clone()], [1.0, 100.0], [16, 16], 3.0, 0)
    assert cheap + dear == 3 * 16 and dear > cheap


def test_model_budget_hits_the_model_wide_target_exactly(tmp_path):
    model = tiny_model("llama")
    measurement = tmp_path / "measurement.safetensors"
    config = BaqConfig(
        bits=2.5,
        allocation="grid",
        budget="model",
        budget_measurement=str(measurement),
        seqlen=SEQLEN,
        num_samples=8,
    )
    quantize_model(model, torch.tensor(calibration_ids()), config, progress=False)
    layers = [m for m in model.modules() if isinstance(m, BaqLinear)]
    code_bits = sum(int(m.stored_bits.sum()) * m.out_features for m in layers)
    weights = sum(m.in_features * m.out_features for m in layers)
    assert code_bits == 2.5 * weights
    assert len({round(m.code_bits, 6) for m in layers}) > 1  # bits moved between layers
    assert measurement.is_file()


def test_saved_measurement_solves_another_target_without_measuring(tmp_path, monkeypatch):
    from baq_hf import calibration

    path = tmp_path / "m.safetensors"
    ids = torch.tensor(calibration_ids())
    common = dict(
        allocation="grid", budget="model", budget_measurement=str(path), seqlen=SEQLEN, num_samples=8
    )
    quantize_model(tiny_model("llama"), ids, BaqConfig(bits=3, **common), progress=False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the saved measurement should have been used")

    monkeypatch.setattr(calibration, "measure_model", must_not_run)
    model = tiny_model("llama")
    quantize_model(model, ids, BaqConfig(bits=2, **common), progress=False)
    layers = [m for m in model.modules() if isinstance(m, BaqLinear)]
    assert sum(int(m.stored_bits.sum()) * m.out_features for m in layers) == 2 * sum(
        m.in_features * m.out_features for m in layers
    )
    with pytest.raises(ValueError, match=r"other settings \(group_size\)"):
        quantize_model(tiny_model("llama"), ids, BaqConfig(bits=2, group_size=32, **common), progress=False)


def test_gradient_energies_cover_every_layer():
    from baq_hf.calibration import gradient_energies, plan_quantization

    model = tiny_model("llama")
    plan = plan_quantization(model, BaqConfig(bits=3))
    energies = gradient_energies(model, plan, torch.tensor(calibration_ids(n=2)))
    assert len(energies) == sum(len(n) for n in plan.layers)
    assert all(v > 0 for v in energies.values())
    assert all(p.grad is None for p in model.parameters())


def test_model_budget_needs_an_allocation_that_re_solves_layers():
    with pytest.raises(ValueError, match="budget"):
        BaqConfig(bits=3, allocation="uniform", budget="model")
    with pytest.raises(ValueError, match="budget_weighting"):
        BaqConfig(bits=3, budget="model", budget_weighting="hessian")
