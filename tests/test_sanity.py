"""The sanity figure of every quantization: perplexity before and after on held-out calibration text."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from baq_hf import BaqConfig, cli, data
from baq_hf.eval import windows_nll
from baq_hf.sanity import FAILED_RATIO, format_sanity, sanity_report

from .conftest import tiny_model
from .test_cli import make_tokenizer, save_tiny_with_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

TEXT = data.default_calibration_text()[:20_000]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_calibration_windows_are_unchanged_and_the_heldout_ones_disjoint(tokenizer):
    windows, heldout = data.calibration_and_heldout([TEXT], tokenizer, 8, 64, 0, 4, 32)
    assert torch.equal(windows, data.calibration_windows([TEXT], tokenizer, 8, 64, 0))
    # the GPTQ draw, written out: seeded uniform starts, so published checkpoints stay byte-identical
    ids = data.tokenize_text(tokenizer, TEXT)
    starts = torch.randint(0, ids.numel() - 64 + 1, (8,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(windows, torch.stack([ids[s : s + 64] for s in starts.tolist()]))
    covered = {p for s in starts.tolist() for p in range(s, s + 64)}
    assert heldout.shape == (4, 32)
    stretches = ids.unfold(0, 32, 1)
    for window in heldout:
        positions = torch.nonzero((stretches == window).all(dim=1)).flatten().tolist()
        assert any(covered.isdisjoint(range(p, p + 32)) for p in positions)


def test_heldout_token_ids_are_the_windows_after_the_calibration_ones():
    rows = torch.arange(10 * 16).view(2, 80)  # 2 rows of 5 windows of 16
    windows, heldout = data.calibration_and_heldout(rows, None, 3, 16, 0, 4, 8)
    assert torch.equal(windows, rows.reshape(-1, 16)[:3])
    assert torch.equal(heldout, rows.reshape(-1, 16)[3:7, :8])


def test_no_heldout_text_is_reported_as_skipped(tokenizer):
    short = TEXT[:2000]
    _, heldout = data.calibration_and_heldout([short], tokenizer, 64, 64, 0, 4, 64)
    assert heldout.shape == (0, 64)
    entry = sanity_report(None, None, heldout)
    assert "overlaps a calibration window" in entry["skipped"] and "ppl_after" not in entry
    assert format_sanity(entry).startswith("sanity check not measured")


def test_from_pretrained_reports_perplexity_before_and_after(tokenizer, tmp_path):
    fp = tiny_model("llama")
    fp.save_pretrained(tmp_path)
    config = BaqConfig(bits=3, dataset=[TEXT], tokenizer=tokenizer, num_samples=4, seqlen=32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    entry = model.baq_report["sanity"]
    json.dumps(entry, allow_nan=False)
    _, heldout = data.calibration_and_heldout([TEXT], tokenizer, 4, 32, 0, 4, 32)
    assert (entry["windows"], entry["seqlen"]) == (4, 32)
    # The quantizer measures inside transformers' loading hook; since the merge with the 16-bit storage
    # work its "after" figure differs from the returned model's by 4.5e-5 relative (not yet explained;
    # suspected: state transformers finishes after the hook), hence 1e-4 for both figures.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert entry["ppl_before"] == pytest.approx(math.exp(windows_nll(loaded, heldout)), rel=1e-4)
    assert entry["ppl_after"] == pytest.approx(math.exp(windows_nll(model, heldout)), rel=1e-4)
    assert entry["ratio"] == pytest.approx(entry["ppl_after"] / entry["ppl_before"])
    assert entry["failed"] is (entry["ratio"] > FAILED_RATIO)


def test_a_huge_ratio_or_broken_model_warns_loudly(caplog):
    windows = torch.zeros(2, 16, dtype=torch.long)
    with caplog.at_level(logging.INFO, logger="baq_hf.sanity"):
        fine = sanity_report(math.log(30), math.log(45), windows)
    assert not fine["failed"] and fine["ratio"] == pytest.approx(1.5)
    assert "LOOKS FAILED" not in caplog.text and "30.00 before, 45.00 after" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="baq_hf.sanity"):
        huge = sanity_report(math.log(30), math.log(3000), windows)
        broken = sanity_report(math.log(30), None, windows)
    assert huge["failed"] and huge["ratio"] == pytest.approx(100)
    assert broken["failed"] and broken["ppl_after"] is None and "ratio" not in broken
    assert caplog.text.count("QUANTIZATION LOOKS FAILED") == 2
    json.dumps([huge, broken], allow_nan=False)


def test_cli_quantize_prints_the_sanity_line_and_saves_it(tmp_path, capsys):
    fp = save_tiny_with_tokenizer(tmp_path / "fp")
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "baq"
    argv = [
        "quantize",
        str(fp),
        "--bits",
        "3",
        "--dataset",
        str(calib),
        "--num-samples",
        "4",
        "--seqlen",
        "32",
    ]
    assert cli.main([*argv, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "baq_report.json").read_text())["report"]["sanity"]
    assert format_sanity(saved) in printed
    assert saved["windows"] == 4 and saved["ppl_before"] > 1 and saved["ppl_after"] > 1
