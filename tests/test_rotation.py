"""The randomized Hadamard rotation (baq_hf/rotation.py) and the rotated layers of BaqConfig.rotation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from baq_hf import BaqConfig, BaqLinear
from baq_hf import format as fmt
from baq_hf import rotation as rot
from baq_hf.calibration import quantize_model
from baq_hf.gptq import prepare
from baq_hf.specs import SolverSpec

from .conftest import calibration_ids, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("order", rot.SMALL_ORDERS)
def test_small_hadamard_matrices_are_hadamard(order):
    h = rot.small_hadamard(order)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.t(), order * torch.eye(order, dtype=torch.float64))


def test_fwht_is_sylvester_hadamard():
    h = torch.ones(1, 1)
    for _ in range(5):
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    x = torch.randn(3, 32)
    assert torch.allclose(rot.fwht(x), x @ h.t(), atol=1e-5)


@pytest.mark.parametrize(("n", "block"), [(64, None), (96, None), (576, None), (1536, None), (640, None),
                                          (576, 64), (576, 128), (1536, 256)])  # fmt: skip
def test_rotation_is_orthogonal_and_exactly_inverted(n, block):
    r = rot.Rotation.for_layer(n, seed=0, name="layer", rotation_block=block)
    eye = torch.eye(n)
    m = r.apply(eye)  # rows: R e_i, i.e. R^T
    assert torch.allclose(m @ m.t(), eye, atol=1e-5)
    x = torch.randn(4, n)
    assert torch.allclose(r.apply_inverse(r.apply(x)), x, atol=1e-5)
    if block is not None:  # block-diagonal: inputs mix only within their block
        blk = r.block
        assert n % blk == 0 and blk <= block
        mask = torch.block_diag(*[torch.ones(blk, blk)] * (n // blk))
        assert torch.all(m[mask == 0] == 0)


def test_block_sizes_and_refusals():
    assert rot.block_for(576, None) == 576 and rot.block_for(1536, None) == 1536
    assert rot.block_for(576, 64) == 64 and rot.block_for(576, 128) == 96 and rot.block_for(1536, 128) == 128
    with pytest.raises(ValueError, match=r"size 4864.*rotation_block"):
        rot.block_for(4864, None, "mlp.down_proj")
    with pytest.raises(ValueError, match="divides the input size 45"):
        rot.block_for(45, 16)


def test_signs_are_deterministic_from_the_seed_and_the_name():
    a = rot.Rotation.for_layer(576, 0, "model.layers.0.q_proj")
    assert torch.equal(a.signs, rot.Rotation.for_layer(576, 0, "model.layers.0.q_proj").signs)
    assert not torch.equal(a.signs, rot.Rotation.for_layer(576, 0, "model.layers.0.k_proj").signs)
    assert not torch.equal(a.signs, rot.Rotation.for_layer(576, 1, "model.layers.0.q_proj").signs)
    assert a.signs.dtype == torch.int8 and set(a.signs.tolist()) == {-1, 1}


def test_rotated_problem_has_the_same_output_error():
    """tr(E H E^T) is invariant: W' = W R^T, H' = R H R^T; prepare() hands the solver exactly that."""
    torch.manual_seed(0)
    w, x = torch.randn(8, 96), torch.randn(200, 96)
    h = 2 * x.t() @ x / 200
    spec = SolverSpec(bits=3, rotation="hadamard", damp_percent=0.01)
    prep = prepare(w, h, spec, "layer")
    r = prep.rotation
    e = torch.randn(8, 96)
    assert torch.allclose(
        ((e @ h) * e).sum(), ((r.rotate_weight(e) @ prep.h) * r.rotate_weight(e)).sum(), rtol=1e-4
    )
    assert torch.allclose(prep.w, r.rotate_weight(w), atol=1e-6)
    assert torch.allclose(r.unrotate_weight(prep.w), w, atol=1e-5)


@pytest.mark.parametrize("block", [None, 32])
def test_float_model_with_the_rotation_folded_in_gives_the_same_logits(block):
    """Every block Linear replaced by W R^T acting on R x: same logits within 1e-5 (96 = 12 x 8 uses the
    Kronecker path, 64 the pure Walsh-Hadamard one)."""
    model = tiny_model("llama", intermediate_size=96)
    ids = torch.tensor(calibration_ids(2, seed=3))
    with torch.no_grad():
        before = model(ids).logits
        for name, module in model.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                r = rot.Rotation.for_layer(module.in_features, 0, name, block)
                module.weight.copy_(r.rotate_weight(module.weight))
                module.register_forward_pre_hook(lambda _m, args, r=r: (r.apply(args[0]),))
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-5)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    """A tiny LLaMA (widths 64 and 96) quantized at 3 bits with a full rotation, saved."""
    model = tiny_model("llama", intermediate_size=96)
    windows = torch.tensor(calibration_ids(8, seed=1))
    config = BaqConfig(bits=3, rotation="hadamard", clip_search=True, num_samples=8, seqlen=32)
    quantize_model(model, windows, config, progress=False)
    model.config.quantization_config = config
    path = tmp_path_factory.mktemp("rotated")
    model.save_pretrained(path)
    return model, path


def test_rotated_checkpoint_reloads_bit_exact(rotated):
    model, path = rotated
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BaqLinear)}
    assert len(layers) == 14 and all(m.baq_weight.rotation is not None for m in layers.values())
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert reloaded.config.quantization_config.rotation == "hadamard"
    for name, module in reloaded.named_modules():
        if isinstance(module, BaqLinear):
            ref = layers[name]
            assert torch.equal(module.rotation_signs, ref.rotation_signs)
            assert torch.equal(module.dequantize(), ref.dequantize())
            assert torch.equal(module.effective_weight(), ref.effective_weight())
    ids = torch.tensor(calibration_ids(2, seed=5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_every_path_rotates_and_dequantize_gives_the_same_model(rotated, monkeypatch):
    """CPU layout, the torch reference and model.dequantize() (a plain float model) agree."""
    _, path = rotated
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor(calibration_ids(2, seed=6))
    with torch.no_grad():
        cpu = model(ids).logits
        monkeypatch.setenv("BAQ_HF_FORCE_TORCH", "1")
        ref = model(ids).logits
        monkeypatch.delenv("BAQ_HF_FORCE_TORCH")
        plain = model.dequantize()
        assert not any(isinstance(m, BaqLinear) for m in plain.modules())
        dense = plain(ids).logits
    assert torch.allclose(cpu, ref, atol=1e-4)
    assert torch.allclose(dense, ref, atol=1e-5)


def test_rotated_layer_matches_the_weights_calibration_propagated(rotated):
    """The quantized model equals a float model carrying the effective (un-rotated) weights."""
    model, _ = rotated
    dense = tiny_model("llama", intermediate_size=96)
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if "layers." not in k}, strict=False)
    dense.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "layers." in k and "norm" in k}, strict=False
    )
    for name, module in model.named_modules():
        if isinstance(module, BaqLinear):
            dense.get_submodule(name).weight.data.copy_(module.effective_weight())
    ids = torch.tensor(calibration_ids(2, seed=7))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-4)


def test_config_validation():
    assert BaqConfig(rotation="hadamard", rotation_block=128).to_dict()["rotation_block"] == 128
    assert BaqConfig.from_dict({"quant_method": "baq", "bits": 3}).rotation is None  # older configs
    with pytest.raises(ValueError, match=r"rotation='quip'.*'hadamard'"):
        BaqConfig(rotation="quip")
    with pytest.raises(ValueError, match=r"rotation_block=64.*needs rotation"):
        BaqConfig(rotation_block=64)
    with pytest.raises(ValueError, match="rotation_block"):
        BaqConfig(rotation="hadamard", rotation_block=1)


def test_impossible_sizes_are_refused_before_quantizing():
    model = tiny_model("llama", intermediate_size=76)  # 76 = 19 x 4: no Hadamard matrix of that size here
    config = BaqConfig(bits=3, rotation="hadamard", num_samples=2, seqlen=32)
    with pytest.raises(ValueError, match="size 76"):
        quantize_model(model, torch.tensor(calibration_ids(2)), config, progress=False)


def test_validate_refuses_bad_rotation_tensors(rotated):
    model, _ = rotated
    layer = next(m for m in model.modules() if isinstance(m, BaqLinear))
    good = {k: v.clone() for k, v in layer.state_dict().items()}
    shape = layer.weight_shape
    fmt.validate(shape, good)
    for key, value, match in [
        (fmt.ROTATION_SIGNS, torch.zeros_like(good[fmt.ROTATION_SIGNS]), "only \\+1 and -1"),
        (fmt.ROTATION_BLOCK, torch.tensor([48], dtype=torch.int32), "not a Hadamard size"),
        (fmt.ROTATION_BLOCK, torch.tensor([128], dtype=torch.int32), "not a Hadamard size"),
    ]:
        with pytest.raises(ValueError, match=match):
            fmt.validate(shape, {**good, key: value})
    alone = {k: v for k, v in good.items() if k != fmt.ROTATION_BLOCK}
    with pytest.raises(ValueError, match="rotation_block"):
        BaqLinear.from_tensors(alone)
