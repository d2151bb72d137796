import pytest
import torch

from baq_hf.config import BaqConfig
from baq_hf.format import pack_weight
from baq_hf.gptq import HessianAccumulator, prepare, quantize_weight
from baq_hf.linear import BaqLinear


def reference_gptq(w, h, bits, group_size=-1, act_order=False, damp=0.01, blocksize=128):
    """Plain uniform GPTQ, written after the reference `fasterquant` (ranges kept in fp16)."""
    w = w.clone().float()
    h = h.clone()
    maxq = 2**bits - 1

    def find_params(x):
        xmin = torch.clamp(x.min(1).values, max=0).half().float()
        xmax = torch.clamp(x.max(1).values, min=0).half().float()
        bad = xmax <= xmin
        xmin[bad], xmax[bad] = -1, 1
        scale = (xmax - xmin) / maxq
        zero = torch.floor(-xmin / scale + 0.5)
        return scale, zero

    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.arange(w.shape[1])
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    scale, zero = find_params(w)
    q_all = torch.zeros_like(w)
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    n = w.shape[1]
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if group_size != -1 and (i1 + i) % group_size == 0:
                scale, zero = find_params(w[:, i1 + i : i1 + i + group_size])
            x = w1[:, i]
            d = hinv1[i, i]
            q = scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)
            q_all[:, i1 + i] = q
            e = (x - q) / d
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return q_all[:, inv]


def layer_problem(m=48, n=96, seed=0, dead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, n, generator=g) * torch.rand(n, generator=g) * 2
    x[:, list(dead)] = 0
    acc = HessianAccumulator(n, torch.device("cpu"))
    for chunk in x.split(100):
        acc.add(chunk)
    return torch.randn(m, n, generator=g), acc.h, x


@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uniform_allocation_reproduces_reference_gptq_exactly(bits, act_order, group_size):
    w, h, _ = layer_problem()
    cfg = BaqConfig(
        bits=bits, allocation="uniform", group_size=group_size, act_order=act_order, block_size=32
    )
    got = quantize_weight(w, h, cfg).q
    ref = reference_gptq(w, h, bits, group_size, act_order, blocksize=32)
    assert torch.equal(got, ref)


def test_hessian_is_a_running_mean():
    _, h, x = layer_problem()
    assert torch.allclose(h, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("allocation", ["baq", "paper", "measured", "uniform"])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_packed_layer_dequantizes_to_solver_output_bit_for_bit(allocation, group_size):
    w, h, _ = layer_problem(seed=1)
    cfg = BaqConfig(bits=3, allocation=allocation, group_size=group_size, act_order=True)
    r = quantize_weight(w, h, cfg)
    layer = BaqLinear.from_packed(pack_weight(r.codes, r.bits, r.range_min, r.range_max, r.group_of_column))
    layer.validate("test")
    assert torch.equal(layer.dequantize(), r.q)
    assert torch.equal(layer.column_bits(), r.bits)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_baq_loss_is_below_uniform_at_equal_bits(bits):
    w, h, _ = layer_problem(seed=2)
    baq = quantize_weight(w, h, BaqConfig(bits=bits, compare_uniform=True))
    assert baq.stats["code_bits"] == bits
    assert baq.stats["loss"] < baq.stats["uniform_loss"]
    assert 0 < baq.stats["ratio_c"] <= 1


def test_dead_inputs_get_zero_weight_and_no_bits():
    w, h, _ = layer_problem(dead=(3, 17))
    r = quantize_weight(w, h, BaqConfig(bits=2))
    assert torch.all(r.q[:, [3, 17]] == 0)
    assert r.bits[3] == 0 and r.bits[17] == 0


def test_non_finite_weights_are_rejected():
    w, h, _ = layer_problem()
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_weight(w, h, BaqConfig(bits=2), name="layer.x")


def test_non_finite_activations_are_rejected():
    acc = HessianAccumulator(4, torch.device("cpu"), "blk.q_proj")
    with pytest.raises(ValueError, match=r"blk\.q_proj"):
        acc.add(torch.tensor([[1.0, float("inf"), 0.0, 0.0]]))


def test_indefinite_hessian_retries_with_more_damping():
    w, h, _ = layer_problem()
    h = h - 1.5 * torch.eye(h.shape[0]) * torch.diag(h).mean()  # indefinite, diag still mostly positive
    h[range(h.shape[0]), range(h.shape[0])] = torch.diag(h).abs() + 1e-3
    prep = prepare(w, h, 0.01, False)
    assert torch.isfinite(prep.u).all()


def test_hopeless_hessian_gives_a_clear_error():
    w, _, _ = layer_problem()
    h = -torch.ones(96, 96)
    with pytest.raises(ValueError, match="not positive definite"):
        prepare(w, h, 0.01, False, name="blk.o_proj")
