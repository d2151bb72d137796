"""Saved safetensors files are readable like the rest of their folder (safetensors >= 0.8 writes 0600)."""

from __future__ import annotations

import copy
import io
import os
import stat

import pytest
import torch
from transformers import AutoModelForCausalLM

from baq_hf import BaqConfig, budget, filemode
from baq_hf.checkpoint import save_quantized

from .conftest import calibration_ids, tiny_model

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX"),
]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    src = tmp_path_factory.mktemp("fp")
    tiny_model("llama").save_pretrained(src)
    config = BaqConfig(bits=2.5, dataset=calibration_ids(), num_samples=8, seqlen=32)
    return AutoModelForCausalLM.from_pretrained(src, quantization_config=config)


def test_current_umask_is_read_without_changing_it(umask):
    assert filemode.current_umask() == umask
    assert filemode.new_file_mode() == 0o666 & ~umask
    assert filemode.current_umask() == umask


def test_save_pretrained_of_a_baq_model_writes_readable_weights(quantized, tmp_path, umask):
    quantized.save_pretrained(tmp_path)
    assert mode(tmp_path / "model.safetensors") == mode(tmp_path / "config.json") == 0o666 & ~umask


def test_save_quantized_writes_readable_weights(quantized, tmp_path, umask):
    out = save_quantized(quantized, tmp_path / "out")
    assert mode(out / "model.safetensors") == mode(out / "config.json") == 0o666 & ~umask


def test_the_readable_save_survives_copy_and_pickle(quantized, tmp_path):
    clone = copy.deepcopy(quantized)
    assert clone.save_pretrained.__self__ is clone
    buffer = io.BytesIO()
    torch.save(quantized, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    restored.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()


def test_budget_measurement_file_is_readable(tmp_path, umask):
    m = budget.LayerMeasurement(torch.zeros(3, 2), 4, 1.0, 1.0)
    budget.save(tmp_path / "m.safetensors", {"layer": m}, {"bits": 2})
    assert mode(tmp_path / "m.safetensors") == 0o666 & ~umask
