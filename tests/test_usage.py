"""A quantized model works unchanged in the usual transformers workflows.

generate, pipeline("text-generation"), device_map / accelerate offload (to "cpu" and "disk"),
torch.compile, and model.dequantize(), on tiny random LLaMA and OPT models (OPT's BaqLinear layers
carry a bias, a parameter that accelerate offloads; LLaMA's have only buffers).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import dispatch_model
from transformers import AutoModelForCausalLM, pipeline

from baq_hf import BaqConfig, BaqLinear

from .conftest import calibration_ids
from .test_cli import make_tokenizer

PROMPT = "the tower is"
# The BaqLinear buffers, i.e. the packed weight, that must reach the forward pass intact.
BUFFERS = ("weight", "bits_header", "perm", "range_min", "range_max")
# Non-block modules of each tiny architecture, kept on "cpu" when the blocks are offloaded.
OUTSIDE = {
    "llama": ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"],
    "opt": [
        "model.decoder.embed_tokens",
        "model.decoder.embed_positions",
        "model.decoder.final_layer_norm",
        "lm_head",
    ],
}
BLOCKS = {"llama": "model.layers", "opt": "model.decoder.layers"}


pytestmark = pytest.mark.usefixtures("single_thread")


def offload_map(arch: str, where: str = "disk") -> dict[str, str]:
    """Block 0 on the CPU, block 1 offloaded to ``where``."""
    device_map = dict.fromkeys(OUTSIDE[arch], "cpu")
    device_map[f"{BLOCKS[arch]}.0"] = "cpu"
    device_map[f"{BLOCKS[arch]}.1"] = where
    return device_map


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def saved(tiny_checkpoints, tmp_path_factory):
    """Per architecture: the freshly quantized model and the folder it was saved to."""
    out = {}
    variants = {
        "llama": ("llama", {}),
        "opt": ("opt", {}),
        # groups in act-order, symmetric ranges: every optional tensor and code path of the format
        "llama-grouped": ("llama", {"group_size": 32, "act_order": True, "sym": True, "bits": 2.75}),
        # the input rotation: 64 inputs (Walsh-Hadamard) and 96 = 12 x 8 (Paley's 12 by Kronecker)
        "llama-rotated": ("llama", {"rotation": "hadamard"}),
    }
    for name, (arch, extra) in variants.items():
        settings = {"bits": 2.5, "dataset": calibration_ids(), "num_samples": 8, "seqlen": 32, **extra}
        config = BaqConfig(**settings)
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], quantization_config=config)
        folder = tmp_path_factory.mktemp(f"usage-{name}")
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def ids(seed: int = 5) -> torch.Tensor:
    return torch.tensor(calibration_ids(2, seed=seed))


def logits(model: torch.nn.Module, seed: int = 5) -> torch.Tensor:
    with torch.no_grad():
        return model(ids(seed)).logits


def baq_layers(model: torch.nn.Module) -> dict[str, BaqLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BaqLinear)}


def test_generate_is_identical_after_reload(saved, tokenizer):
    model, folder = saved["llama"]
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    enc = tokenizer(PROMPT, return_tensors="pt")
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    out = model.generate(**enc, **kw)
    assert out.shape == (1, enc["input_ids"].shape[1] + 6)
    assert torch.equal(reloaded.generate(**enc, **kw), out)


def test_text_generation_pipeline(saved, tokenizer):
    model, folder = saved["llama"]
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    generator = pipeline("text-generation", model=reloaded, tokenizer=tokenizer)
    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    (result,) = generator(PROMPT, **kw)
    assert result["generated_text"].startswith(PROMPT)
    (tokens,) = generator(PROMPT, return_tensors=True, **kw)
    expected = model.generate(**tokenizer(PROMPT, return_tensors="pt"), **kw)[0].tolist()
    assert tokens["generated_token_ids"] == expected


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto"])
def test_device_map(saved, device_map):
    """ "auto" puts the tiny model on the GPU when there is one (Triton kernels), else on the CPU."""
    model, folder = saved["llama"]
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map)
    on_gpu = device_map == "auto" and torch.cuda.is_available()
    expected_device = "cuda" if on_gpu else "cpu"
    assert all(t.device.type == expected_device for t in loaded.state_dict().values())
    if on_gpu:  # the kernels accumulate in another order than the CPU reference
        with torch.no_grad():
            got = loaded(ids().to("cuda")).logits.cpu()
        assert torch.allclose(got, logits(model), atol=1e-4)
    else:
        assert torch.equal(logits(loaded), logits(model))


def test_device_map_with_a_block_on_disk(saved, tmp_path):
    """from_pretrained with a "disk" entry: LLaMA's BaqLinear hold only buffers, which stay in memory."""
    model, folder = saved["llama"]
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, device_map=offload_map("llama"), offload_folder=tmp_path
    )
    assert loaded.hf_device_map["model.layers.1"] == "disk"
    assert loaded.model.layers[1].input_layernorm.weight.device.type == "meta"  # really offloaded
    expected = baq_layers(model)
    for name, layer in baq_layers(loaded).items():
        for buffer in BUFFERS:
            stored, wanted = layer.state_dict()[buffer], expected[name].state_dict()[buffer]
            assert torch.equal(stored, wanted), (name, buffer)
    assert torch.equal(logits(loaded), logits(model))
    assert torch.equal(logits(loaded, seed=6), logits(model, seed=6))  # and again, after hooks ran


@pytest.mark.parametrize(
    ("arch", "offload_buffers"), [("llama", True), ("opt", False)], ids=["buffers-on-disk", "bias-on-disk"]
)
def test_from_pretrained_offloading_baq_tensors_to_disk(saved, tmp_path, arch, offload_buffers):
    """BaqLinear tensors themselves on disk at load time (the bias param, or all with offload_buffers).

    Known core limitation: the loader validates every BaqLinear (BaqLinear.validate/post_init) right
    after loading, and offloaded tensors are still on the meta device then. This test turns into a
    pass, with no edit here, once the loader skips or defers that check for offloaded layers.
    """
    model, folder = saved[arch]
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, device_map=offload_map(arch), offload_folder=tmp_path, offload_buffers=offload_buffers
        )
    except (RuntimeError, NotImplementedError) as exc:
        if "meta" not in str(exc):
            raise
        pytest.xfail(f"core: BaqLinear.validate() reads offloaded (meta) tensors at load time: {exc}")
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("where", ["disk", "cpu"])
def test_dispatch_model_offloads_baq_layers(saved, tmp_path, arch, where):
    """accelerate.dispatch_model on a loaded model, buffers included: weights stream in per forward.

    "cpu" offload means "kept in CPU memory, run on the GPU", so it needs a GPU; "disk" runs anywhere.
    """
    if where == "cpu" and not torch.cuda.is_available():
        pytest.skip("offloading to 'cpu' means executing on a GPU")
    model, folder = saved[arch]
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    expected = logits(model)
    main = "cuda" if torch.cuda.is_available() else "cpu"
    device_map = {k: (main if v == "cpu" else v) for k, v in offload_map(arch, where).items()}
    dispatched = dispatch_model(
        loaded, device_map=device_map, main_device=main, offload_dir=tmp_path, offload_buffers=True
    )
    block1 = dict(baq_layers(dispatched))
    offloaded = [layer for name, layer in block1.items() if f"{BLOCKS[arch]}.1." in name]
    assert offloaded and all(layer.weight.device.type == "meta" for layer in offloaded)
    with torch.no_grad():
        first = dispatched(ids().to(main)).logits.cpu()
        second = dispatched(ids().to(main)).logits.cpu()  # buffers survive the first round trip
    if main == "cpu":
        assert torch.equal(first, expected) and torch.equal(second, expected)
    else:  # the Triton kernels accumulate in another order than the CPU reference
        assert torch.allclose(first, expected, atol=1e-4) and torch.equal(first, second)


def test_torch_compile_of_a_baq_layer(saved):
    """Inductor on CPU compiles a BaqLinear (the unpacking included) and matches eager."""
    model, _ = saved["llama"]
    layer = model.model.layers[0].self_attn.q_proj
    torch._dynamo.reset()
    compiled = torch.compile(layer)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(compiled(x), layer(x), atol=1e-6)
        assert torch.allclose(compiled(2 * x), layer(2 * x), atol=1e-6)


@pytest.mark.slow
def test_torch_compile_of_the_whole_model(saved):
    """The whole quantized model under torch.compile: minutes of Inductor compilation on 2 CPU cores
    (2.5-5 min measured on a shared machine), mostly because every BaqLinear.dequantize() graph-breaks
    on the data-dependent segment computation; the single-layer test above is the fast check."""
    model, _ = saved["llama"]
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        assert torch.allclose(compiled(ids()).logits, logits(model), atol=1e-5)


def test_dequantize_gives_a_plain_model(saved, tmp_path):
    _, folder = saved["llama"]
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    expected = {n: m.dequantize() for n, m in baq_layers(loaded).items()}
    before = logits(loaded)
    plain = loaded.dequantize()
    assert not baq_layers(plain)
    for name, weight in expected.items():
        linear = plain.get_submodule(name)
        assert type(linear) is torch.nn.Linear and torch.equal(linear.weight, weight)
    assert getattr(plain.config, "quantization_config", None) is None
    # the packed model's CPU product regroups the sums of the dense one: equal up to fp32 rounding
    torch.testing.assert_close(logits(plain), before, rtol=1e-4, atol=1e-5)
    plain.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not baq_layers(again) and getattr(again.config, "quantization_config", None) is None
    assert torch.equal(logits(again), logits(plain))


@pytest.mark.parametrize("variant", ["llama", "opt", "llama-grouped", "llama-rotated"])
def test_format_doc_numpy_dequantizer_is_bit_exact(saved, variant):
    """docs/format.md's NumPy reader, run as printed, reproduces BaqLinear.dequantize() bit for bit."""
    from safetensors import safe_open

    doc = (Path(__file__).resolve().parents[1] / "docs" / "format.md").read_text(encoding="utf-8")
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if "def dequantize(" in b]
    namespace: dict = {}
    exec(code, namespace)
    model, folder = saved[variant]
    layers = baq_layers(model)
    assert layers
    for name, layer in layers.items():
        with safe_open(str(folder / "model.safetensors"), "np") as f:  # as docs/format.md says
            tensors = {
                k: f.get_tensor(k)
                for k in f.keys()  # noqa: SIM118 - safe_open is not a mapping
                if k.startswith(name + ".") and not k.endswith(".bias")
            }
        expected = layer.dequantize().numpy()
        got = namespace["dequantize"](tensors, name)
        assert got.dtype == np.float32 and np.array_equal(got.view(np.int32), expected.view(np.int32)), name


def test_format_doc_numpy_rotation_gives_the_effective_weight(saved):
    """docs/format.md's NumPy rotation reader gives BaqLinear.effective_weight() (to fp32 rounding)."""
    from safetensors import safe_open

    doc = (Path(__file__).resolve().parents[1] / "docs" / "format.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if "def dequantize(" in b]
    (rotation,) = [
        b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if "def rotation_matrix(" in b
    ]
    namespace: dict = {}
    exec(blocks[0], namespace)
    exec(rotation, namespace)
    model, folder = saved["llama-rotated"]
    layers = baq_layers(model)
    assert {layer.in_features for layer in layers.values()} == {64, 96}
    for name, layer in layers.items():
        with safe_open(str(folder / "model.safetensors"), "np") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}  # noqa: SIM118
        got = namespace["effective_weight"](tensors, name)
        assert np.allclose(got, layer.effective_weight().numpy(), atol=1e-5), name
