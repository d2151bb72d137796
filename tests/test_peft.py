"""LoRA through peft on a tiny BAQ model: peft's own calls after `import baq_hf`, no helper, no patch."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip(
    "peft", reason="LoRA fine-tuning needs the optional extra: pip install 'baq_hf[peft]'"
)

from transformers import AutoModelForCausalLM  # noqa: E402

from baq_hf.linear import BaqLinear  # noqa: E402
from baq_hf.packed import PackedCodesError  # noqa: E402

from .conftest import calibration_ids  # noqa: E402
from .test_hf_integration import quantize  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def saved(tiny_checkpoints, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("baq-llama-peft")
    quantize(tiny_checkpoints["llama"], group_size=32).save_pretrained(folder)
    return str(folder)


def codes(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".base_layer." in k or "proj." in k}


def train(model, steps: int = 8) -> list[float]:
    ids = torch.tensor(calibration_ids(4, seed=3))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_trains_and_leaves_the_codes_alone(saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved)
    model.gradient_checkpointing_enable()
    assert model.hf_quantizer.is_trainable and not model.hf_quantizer.is_qat_trainable
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.0))
    wrapped = [m for m in lora.modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert len(wrapped) == 6 and all(isinstance(m.base_layer, BaqLinear) for m in wrapped)
    before = {k: v.clone() for k, v in lora.state_dict().items() if "lora_" not in k}
    lora.train()
    losses = train(lora)
    assert losses[-1] < losses[0] - 0.1 and losses == sorted(losses, reverse=True), losses
    after = lora.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # codes, ranges, norms: unchanged
    assert all(b.grad is None for m in wrapped for b in m.base_layer.buffers())

    lora.eval()
    ids = torch.tensor([calibration_ids(1, seed=5)[0]])
    with torch.no_grad():
        expected = lora(ids).logits
    lora.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(saved), tmp_path / "adapter"
    )
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)

    with pytest.raises(PackedCodesError, match="dequantize the model first"):
        reloaded.merge_and_unload()
    reloaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(saved), tmp_path / "adapter"
    )
    reloaded.base_model.model.dequantize()  # float layers under the adapters: no longer quantized
    merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, (BaqLinear, peft.tuners.lora.LoraLayer)) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_the_weight_refuses_float_use(saved):
    layer = AutoModelForCausalLM.from_pretrained(saved).model.layers[0].self_attn.q_proj
    words = layer.qweight.clone()
    for use in (
        lambda w: w.data.__iadd__(torch.ones_like(words).float().to(torch.int32)),  # peft's merge
        lambda w: w.data.clone(),  # peft's safe merge
        lambda w: w.norm(),  # DoRA
        lambda w: w.float(),
        lambda w: torch.nn.init.normal_(w),
    ):
        with pytest.raises(PackedCodesError):
            use(layer.weight)
    assert torch.equal(layer.qweight, words) and type(layer.state_dict()["weight"]) is torch.Tensor
    assert layer.weight.dtype == torch.int32 and layer.weight.shape == words.shape
