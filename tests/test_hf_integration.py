"""from_pretrained with BaqConfig on tiny LLaMA, OPT and GPT-2 (Conv1D); exact save/reload."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import baq_hf
from baq_hf import BaqConfig, BaqLinear
from baq_hf.format import read_safetensors_header

from .conftest import calibration_ids, tiny_model


def quantize(path, **kw):
    cfg = dict(bits=2.5, dataset=calibration_ids(), num_samples=8, seqlen=32)
    cfg.update(kw)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=BaqConfig(**cfg))


@pytest.fixture(scope="module")
def quantized(tiny_checkpoints, tmp_path_factory):
    """One quantized and saved model per architecture."""
    out = {}
    for arch, path in tiny_checkpoints.items():
        model = quantize(path, group_size=32 if arch == "llama" else -1, act_order=arch == "opt")
        saved = tmp_path_factory.mktemp(f"baq-{arch}")
        model.save_pretrained(saved)
        out[arch] = (model, str(saved))
    return out


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_every_block_linear_becomes_baq_and_hits_the_bit_target(quantized, arch):
    model, _ = quantized[arch]
    layers = [m for m in model.modules() if isinstance(m, BaqLinear)]
    expected = {"llama": 14, "opt": 12, "gpt2": 8}[arch]
    assert len(layers) == expected
    for layer in layers:
        assert layer.code_bits == pytest.approx(2.5, abs=1 / layer.in_features)
        assert layer.effective_bits > layer.code_bits
    assert not isinstance(model.get_output_embeddings(), BaqLinear)
    assert model.config.quantization_config.quant_method == "baq"


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_reload_is_bit_exact(quantized, arch):
    model, saved = quantized[arch]
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    a, b = model.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    ids = torch.tensor(calibration_ids(2, seed=5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert isinstance(reloaded.config.quantization_config, BaqConfig)


def test_quantized_weights_match_what_calibration_used(quantized, tiny_checkpoints):
    """The quantized model's logits equal a float model carrying the dequantized weights.

    The unquantized tensors (embeddings, norms) are the quantized model's, rounded to 16 bits.
    """
    model, _ = quantized["llama"]
    dense = tiny_model("llama")
    unquantized = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    dense.load_state_dict(unquantized, strict=False)
    for name, module in model.named_modules():
        if isinstance(module, BaqLinear):
            dense.get_submodule(name).weight.data.copy_(module.dequantize())
    ids = torch.tensor(calibration_ids(2, seed=6))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-5)


def test_memory_footprint_shrinks(quantized, tiny_checkpoints):
    model, _ = quantized["llama"]
    fp = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    linear_fp = sum(m.weight.numel() * 4 for m in fp.model.layers.modules() if isinstance(m, torch.nn.Linear))
    linear_q = sum(m.storage_bytes() for m in model.modules() if isinstance(m, BaqLinear))
    assert linear_q < linear_fp / 5
    assert fp.get_memory_footprint() - model.get_memory_footprint() == linear_fp - linear_q


def test_generate_and_dequantize(quantized):
    model, saved = quantized["llama"]
    ids = torch.tensor(calibration_ids(1, seqlen=8, seed=7))
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    before = reloaded(ids).logits
    reloaded.dequantize()
    assert not any(isinstance(m, BaqLinear) for m in reloaded.modules())
    assert torch.allclose(reloaded(ids).logits, before, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_dtype_casts_keep_the_fp16_ranges_and_the_exact_weights(quantized, arch):
    """model.to(bfloat16) casts the bias (OPT has some) but not range_min/range_max, which define the grid."""
    _, saved = quantized[arch]
    model = AutoModelForCausalLM.from_pretrained(saved)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BaqLinear)}
    exact = {name: m.dequantize() for name, m in layers.items()}
    assert (arch == "opt") == any(m.bias is not None for m in layers.values())
    for dtype in (torch.bfloat16, torch.float32):
        model.to(dtype)
        for name, layer in layers.items():
            assert layer.range_min.dtype == layer.range_max.dtype == torch.float16, name
            assert layer.bias is None or layer.bias.dtype == dtype, name
            assert torch.equal(layer.dequantize(), exact[name]), name
            layer.validate(name)
    model.to(torch.bfloat16)
    ids = torch.tensor(calibration_ids(1, seqlen=8, seed=8))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_load_state_dict_rebuilds_what_the_header_defines(quantized):
    """A layer whose bitwidths were already derived (here by repr) takes those of the loaded bits_header."""
    model, _ = quantized["llama"]
    source = model.model.layers[0].mlp.down_proj
    layer = BaqLinear(
        source.in_features,
        source.out_features,
        bias=False,
        n_words=source.weight.numel(),
        group_size=source.group_size,
    )
    repr(layer)  # caches the bitwidths of the empty layer's all-zero header
    layer.load_state_dict(source.state_dict())
    assert torch.equal(layer.stored_bits, source.stored_bits)
    assert layer.segments == source.segments
    assert layer.code_bits == source.code_bits
    assert torch.equal(layer.dequantize(), source.dequantize())
    x = torch.randn(2, source.in_features)
    assert torch.equal(layer(x), source(x))


def test_loading_without_import_fails_loudly(quantized):
    _, saved = quantized["llama"]
    code = f"from transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained({saved!r})\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "baq" in proc.stderr and "mismatched" in proc.stderr


def test_too_short_calibration_data_is_rejected(tiny_checkpoints):
    with pytest.raises(ValueError, match="seqlen"):
        quantize(tiny_checkpoints["llama"], dataset=[[1, 2, 3]], seqlen=32)


def test_seqlen_above_model_limit_is_rejected(tiny_checkpoints):
    ids = torch.randint(0, 128, (2, 256)).tolist()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        quantize(tiny_checkpoints["llama"], dataset=ids, num_samples=2, seqlen=256)


def test_model_without_quantizable_layer_is_rejected(tiny_checkpoints):
    with pytest.raises(ValueError, match="no quantizable layer"):
        quantize(tiny_checkpoints["llama"], modules_to_not_convert=["self_attn", "mlp"])


def test_registration_is_through_transformers_registry():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["baq"] is baq_hf.BaqHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["baq"] is BaqConfig


def stored_dtypes(folder) -> dict[str, str]:
    return {key: info.dtype for key, info in read_safetensors_header(f"{folder}/model.safetensors").items()}


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_unquantized_tensors_are_saved_in_16_bits(quantized, arch):
    """A float32 model's embeddings, norms and biases are stored as bfloat16, the packed layers as before."""
    model, saved = quantized[arch]
    dtypes = stored_dtypes(saved)
    packed = {
        f"{name}.{t}"
        for name, m in model.named_modules()
        if isinstance(m, BaqLinear)
        for t in (spec.name for spec in m.weight_shape.specs())
    }
    assert {dtypes[k] for k in dtypes if k.endswith((".range_min", ".range_max"))} == {"F16"}
    assert {dtypes[k] for k in dtypes if k not in packed or k.endswith(".bias")} == {"BF16"}
    assert model.dtype == torch.float32  # computation stays in float32, before and after reloading
    assert AutoModelForCausalLM.from_pretrained(saved).dtype == torch.float32


def test_keep_float32_and_tied_embeddings(tmp_path):
    """keep_float32 keeps float32 files; tied embeddings are stored once in either case."""
    tiny_model("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "fp")
    sizes = {}
    for keep in (False, True):
        model = quantize(tmp_path / "fp", keep_float32=keep)
        model.save_pretrained(tmp_path / f"q{keep}")
        dtypes = stored_dtypes(tmp_path / f"q{keep}")
        assert "lm_head.weight" not in dtypes and dtypes["model.embed_tokens.weight"] == (
            "F32" if keep else "BF16"
        )
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"q{keep}")
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
        for key, tensor in model.state_dict().items():
            assert torch.equal(reloaded.state_dict()[key], tensor), key
        sizes[keep] = (tmp_path / f"q{keep}" / "model.safetensors").stat().st_size
    embedding_bytes = model.model.embed_tokens.weight.numel() * 2
    assert sizes[True] - sizes[False] >= embedding_bytes  # the float32 file holds the embeddings once


def test_checkpoints_written_before_16_bit_storage_are_saved_as_they_were(quantized, tmp_path):
    """An older checkpoint (float32 tensors, no keep_float32 in config.json) is re-saved in float32."""
    _, saved = quantized["opt"]
    old = tmp_path / "old"
    shutil.copytree(saved, old)
    tensors = load_file(old / "model.safetensors")
    save_file(
        {k: t.float() if t.dtype == torch.bfloat16 else t for k, t in tensors.items()},
        old / "model.safetensors",
    )
    config = json.loads((old / "config.json").read_text())
    del config["quantization_config"]["keep_float32"]
    (old / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(old)
    assert model.config.quantization_config.keep_float32 and not BaqConfig().keep_float32
    model.save_pretrained(tmp_path / "again")
    assert stored_dtypes(tmp_path / "again") == stored_dtypes(old)
    assert "F32" in set(stored_dtypes(old).values())


def test_dequantize_after_quantizing_and_saving_gives_the_same_logits(tiny_checkpoints, tmp_path):
    """After save_pretrained, the config's dtype (which transformers hands _dequantize) is a string."""
    model = quantize(tiny_checkpoints["llama"])
    model.save_pretrained(tmp_path)
    ids = torch.tensor([calibration_ids(1)[0]])
    with torch.no_grad():
        packed = model(ids).logits
        dense = model.dequantize()(ids).logits
    assert not any(isinstance(m, BaqLinear) for m in model.modules())
    # the packed layers' CPU product regroups the dense matmul's sums: equal up to fp32 rounding
    torch.testing.assert_close(packed, dense, rtol=1e-4, atol=1e-5)


def test_a_group_as_wide_as_the_row_is_stored_per_row(tiny_checkpoints, tmp_path):
    """group_size == in_features (64 here; down_proj's 96 skipped) is one range per row, and reloads."""
    model = quantize(tiny_checkpoints["llama"], bits=3, group_size=64, modules_to_not_convert=["down_proj"])
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, BaqLinear) and layer.in_features == 64 and layer.group_size == -1
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor(calibration_ids(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
