"""Model card and push_to_hub, without the network.

The upload is intercepted (HfApi.create_repo / upload_folder patched) and the files it would send are
loaded back; ``from_pretrained("user/repo")`` is then checked through the real Hub cache code path by
laying those files out as huggingface_hub's cache (``models--user--repo/snapshots/<commit>``) and
going offline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hub_constants
from transformers import AutoModelForCausalLM, AutoTokenizer

from baq_hf import BaqConfig, BaqLinear, hub
from baq_hf.eval import PerplexityResult

from .conftest import calibration_ids, tiny_model
from .test_cli import make_tokenizer

REPO = "user/tiny-baq"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def quantized(tiny_checkpoints):
    """A tiny LLaMA quantized to 2.25 bits with the measured Ratio_L, fresh from calibration."""
    config = BaqConfig(bits=2.25, dataset=calibration_ids(), num_samples=8, seqlen=32, compare_uniform=True)
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=config)


@pytest.fixture(scope="module")
def pushed(quantized, tokenizer, tmp_path_factory):
    """push_to_hub with the upload intercepted: what would be sent, copied out before cleanup."""
    sent = tmp_path_factory.mktemp("sent")
    calls: dict[str, dict] = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        shutil.copytree(kwargs["folder_path"], sent, dirs_exist_ok=True)
        return "commit-info"

    perplexities = {"wikitext2": {"fp": 20.5, "baq": 31.25}, "c4": PerplexityResult(40.0, 3.7, 2, 62, 32)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HfApi, "create_repo", create_repo)
        mp.setattr(HfApi, "upload_folder", upload_folder)
        result = hub.push_to_hub(
            quantized,
            REPO,
            tokenizer,
            perplexities,
            base_model="org/tiny-llama",
            private=True,
            revision="main",
        )
    return {"result": result, "calls": calls, "sent": sent}


def logits(model, seed: int = 5) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(calibration_ids(2, seed=seed))).logits


def test_push_creates_the_repo_and_uploads_one_folder(pushed):
    calls = pushed["calls"]
    assert pushed["result"] == "commit-info"
    assert calls["create_repo"]["repo_id"] == REPO
    assert calls["create_repo"]["exist_ok"] is True and calls["create_repo"]["private"] is True
    upload = calls["upload_folder"]
    assert upload["repo_id"] == REPO and upload["repo_type"] == "model"
    assert upload["revision"] == "main"  # extra kwargs reach upload_folder
    assert "BAQ" in upload["commit_message"]
    assert not Path(upload["folder_path"]).exists()  # the temp folder is cleaned up


def test_pushed_files(pushed):
    names = {p.name for p in pushed["sent"].iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "baq_report.json"} <= names
    config = json.loads((pushed["sent"] / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "baq" and qc["bits"] == 2.25
    report = json.loads((pushed["sent"] / "baq_report.json").read_text())  # strict JSON, no NaN
    assert len(report["report"]["layers"]) == 14
    assert report["eval"]["wikitext2"] == {"fp": 20.5, "baq": 31.25}
    assert report["eval"]["c4"] == {"fp": None, "baq": 40.0, "seqlen": 32, "windows": 2}
    assert report["base_model"] == "org/tiny-llama"


def test_pushed_files_load_bit_exact(pushed, quantized, tokenizer):
    reloaded = AutoModelForCausalLM.from_pretrained(pushed["sent"])
    assert torch.equal(logits(reloaded), logits(quantized))
    tok = AutoTokenizer.from_pretrained(pushed["sent"])
    text = "the tower is tall"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_card_metadata(pushed, quantized):
    card = ModelCard((pushed["sent"] / "README.md").read_text())
    meta = card.data.to_dict()
    assert meta["base_model"] == "org/tiny-llama" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["quantization"] == "baq" and "baq" in meta["tags"]
    assert meta["bits"] == 2.25 and meta["code_bits"] == pytest.approx(2.25, abs=1e-3)
    layers = [m for m in quantized.modules() if isinstance(m, BaqLinear)]
    n = sum(m.in_features * m.out_features for m in layers)
    assert meta["effective_bits"] == pytest.approx(8 * sum(m.storage_bytes() for m in layers) / n, abs=1e-3)
    assert sum(meta["bit_histogram"].values()) == pytest.approx(1.0, abs=1e-4)
    assert meta["perplexity"] == {
        "wikitext2": {"fp": 20.5, "baq": 31.25},
        "c4": {"baq": 40.0, "seqlen": 32, "windows": 2},
    }
    assert meta["datasets"] == ["allenai/c4"]  # default calibration: the shipped C4 sample


def test_card_body(pushed, quantized):
    text = (pushed["sent"] / "README.md").read_text()
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in text and "import baq_hf" in text
    assert "| wikitext2 | 20.50 | 31.25 | - | - |" in text and "| c4 | - | 40.00 | 32 | 2 |" in text
    rows = [line for line in text.splitlines() if line.startswith("| model.layers.")]
    names = [n for n, m in quantized.named_modules() if isinstance(m, BaqLinear)]
    assert [row.split(" | ")[0][2:] for row in rows] == names
    stats = quantized.baq_report["layers"][names[0]]
    # 2.25 bits: Ratio_L is measured against uniform 2 and 3 bits
    vs = stats["ratio_l_vs"]
    assert f"{stats['ratio_c']:.3f}" in rows[0] and f"2:{vs['2']:.3f} 3:{vs['3']:.3f}" in rows[0]


def test_card_without_base_model_or_perplexities(quantized):
    text = hub.model_card(quantized, None, None)
    meta = ModelCard(text).data.to_dict()
    assert "base_model" not in meta and "perplexity" not in meta
    assert "## Perplexity" not in text and "path/to/this/model" in text
    notes = hub.model_card(quantized, None, None, notes=["weights came from a GGUF file"])
    assert "## Notes" in notes and "- weights came from a GGUF file" in notes


def test_normalize_perplexities():
    result = PerplexityResult(12.0, 2.48, 3, 93, 32)
    assert hub.normalize_perplexities(None) == {}
    assert hub.normalize_perplexities({"a": 3, "b": result, "c": {"fp": {"ppl": 2.0}, "baq": result}}) == {
        "a": {"fp": None, "baq": 3.0},
        "b": {"fp": None, "baq": 12.0, "seqlen": 32, "windows": 3},
        "c": {"fp": 2.0, "baq": 12.0, "seqlen": 32, "windows": 3},
    }
    with pytest.raises(ValueError, match="not a perplexity"):
        hub.normalize_perplexities({"a": "high"})


def test_push_of_a_float_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: pytest.fail("must not upload"))
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **kw: pytest.fail("must not create"))
    with pytest.raises(ValueError, match="no BaqLinear"):
        hub.push_to_hub(tiny_model("llama"), REPO)


def test_from_pretrained_through_the_hub_cache(pushed, quantized, tmp_path, monkeypatch):
    """``from_pretrained("user/tiny-baq")`` resolves through huggingface_hub's cache, offline."""
    cache = tmp_path / "hub"
    repo_dir = cache / "models--user--tiny-baq"
    snapshot = repo_dir / "snapshots" / COMMIT
    shutil.copytree(pushed["sent"], snapshot)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables once, at import: mirror them into its constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    model = AutoModelForCausalLM.from_pretrained(REPO)
    assert torch.equal(logits(model), logits(quantized))
    assert isinstance(model.config.quantization_config, BaqConfig)
    tok = AutoTokenizer.from_pretrained(REPO)
    assert len(tok) == 128
    with pytest.raises(OSError):  # offline and not cached: no silent download attempt
        AutoModelForCausalLM.from_pretrained("user/not-cached")
