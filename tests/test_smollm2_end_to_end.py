"""The whole pipeline on the real SmolLM2-135M: from_pretrained with BaqConfig, evaluation, reload.

A cross-check of the calibration pipeline, not a quality benchmark (benchmarks/quality.py is): with the
reference protocol's calibration (16 C4 windows of 512 tokens), uniform 3-bit GPTQ must land in the
range the reference measurement predicts for this model (far above fp, far below a collapse) and BAQ
at the same code bits must beat it, as it does by 2x on 12 evaluation windows (docs/results/quality.md);
4 windows are scored here to save time. A broken pipeline (e.g. a KV cache left on, inputs not
propagated between blocks) moves uniform GPTQ out of that range or inflates the gain.
"""

from __future__ import annotations

import math

import pytest
import torch

from baq_hf import BaqConfig, BaqLinear, models
from baq_hf import eval as baq_eval

from .test_data_eval_models import require_smollm2

pytestmark = pytest.mark.slow

SEQLEN = 512
WINDOWS = 4


@pytest.fixture(scope="module")
def smollm2():
    require_smollm2()
    from transformers import AutoTokenizer

    path = models.resolve_model("smollm2-135m")
    return path, AutoTokenizer.from_pretrained(path)


def wikitext2_ppl(model, tokenizer) -> float:
    result = baq_eval.evaluate(
        model, tokenizer, ["wikitext2"], seqlen=SEQLEN, max_windows=WINDOWS, progress=False
    )
    return result["wikitext2"].ppl


def quantize(path, tokenizer, allocation: str):
    from transformers import AutoModelForCausalLM

    config = BaqConfig(bits=3, allocation=allocation, tokenizer=tokenizer, num_samples=16, seqlen=SEQLEN)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)


def test_uniform_gptq_in_reference_range_and_baq_beats_it(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    path, tokenizer = smollm2
    fp = wikitext2_ppl(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer)
    uniform = quantize(path, tokenizer, "uniform")
    uniform_ppl = wikitext2_ppl(uniform, tokenizer)
    del uniform
    baq = quantize(path, tokenizer, "baq")
    baq_ppl = wikitext2_ppl(baq, tokenizer)
    layers = [m for m in baq.modules() if isinstance(m, BaqLinear)]
    assert len(layers) == 30 * 7
    # every layer hits the budget exactly: round(3 x in_features) code bits per row
    assert all(m.code_bits == 3 for m in layers)
    # reference protocol (16 x 512 calibration, 12 x 512 eval): fp 34.55, uniform 303, BAQ 160
    assert all(math.isfinite(p) for p in (fp, uniform_ppl, baq_ppl))
    assert 2 * fp < uniform_ppl < 50 * fp, (fp, uniform_ppl)
    assert fp < baq_ppl < 0.8 * uniform_ppl, (fp, uniform_ppl, baq_ppl)
    # and the checkpoint reloads to the same tensors
    baq.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    for key, tensor in baq.state_dict().items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key
