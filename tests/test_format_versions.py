"""Checkpoints of every earlier format version load with the same logits; newer ones are refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import baq_hf  # noqa: F401 - registers "baq"
from baq_hf import BaqConfig, BaqLinear
from baq_hf.format import FORMAT_VERSION
from baq_hf.linear import FORCE_TORCH_ENV

FIXTURES = Path(__file__).resolve().parent / "fixtures"
V1 = sorted(p for p in (FIXTURES / "v1").iterdir() if p.is_dir())


def test_fixtures_are_present():
    assert {p.name for p in V1} == {"llama-per-row", "llama-groups-clip", "gpt2-conv1d"}


@pytest.mark.parametrize("folder", V1, ids=[p.name for p in V1])
def test_release_checkpoint_loads_with_the_same_logits(folder: Path, tmp_path: Path, monkeypatch):
    """The release computed its logits with the reference product (dequantize, then F.linear): with that
    path they are equal to the last bit; the CPU layout's product regroups the sums (fp32 rounding)."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert "format_version" not in config  # written before the version was recorded
    expected = load_file(str(folder / "expected.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.quantization_config.format_version == 1
    assert any(isinstance(m, BaqLinear) for m in model.modules())
    with torch.no_grad():
        fast = model(expected["input_ids"]).logits
        monkeypatch.setenv(FORCE_TORCH_ENV, "1")
        logits = model(expected["input_ids"]).logits
    assert torch.equal(logits, expected["logits"])
    torch.testing.assert_close(fast, logits, rtol=1e-4, atol=1e-4)
    # saved again, it records the version this baq_hf writes and still gives the same logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] == FORMAT_VERSION
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path)(expected["input_ids"]).logits
    assert torch.equal(again, expected["logits"])


def test_newer_format_version_is_refused_by_name(tmp_path: Path):
    folder = tmp_path / "future"
    shutil.copytree(V1[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = FORMAT_VERSION + 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"format version {FORMAT_VERSION + 1} by a newer baq_hf.*upgrade"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("bad", [0, "2", True, 1.5])
def test_format_version_must_be_a_known_integer(bad):
    with pytest.raises(ValueError, match="format_version"):
        BaqConfig(format_version=bad)
