"""Reliability: API misuse, hostile numbers, untrusted checkpoints, determinism, resume, atomic saves, plans.

docs/reliability.md tabulates the bad inputs these tests try and the error each gets; keep both in step.
"""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import baq_hf.checkpoint as ckpt
from baq_hf import BaqConfig, BaqLinear, calibration
from baq_hf.calibration import plan_quantization, quantize_model
from baq_hf.checkpoint import INCOMPLETE_MARKER, STATE_FILE, save_quantized

from .conftest import VOCAB, calibration_ids, tiny_model

Q = "model.layers.0.self_attn.q_proj"


pytestmark = pytest.mark.usefixtures("single_thread")


def windows(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.tensor(calibration_ids(n, seed=seed))


def quantize(model: nn.Module, **kw) -> dict:
    """Quantize in place with quantize_model (what the HF quantizer calls) and mark the config for saving."""
    settings = dict(bits=2.5, num_samples=8, seqlen=32)
    settings.update(kw)
    config = BaqConfig(**settings)
    report = quantize_model(model, windows(config.num_samples), config, progress=False)
    model.config.quantization_config = config
    return report


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def assert_reload_exact(model: nn.Module, folder: Path, dtype=None) -> nn.Module:
    reloaded = AutoModelForCausalLM.from_pretrained(folder, **({"dtype": dtype} if dtype else {}))
    assert_same_state(model, reloaded)
    ids = torch.tensor(calibration_ids(2, seed=5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    return reloaded


def word_tokenizer():
    """A whitespace word-level tokenizer (no training, no download) with ids below the tiny VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>"] + [f"w{i}" for i in range(VOCAB - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


# ----------------------------------------------------------------------------------------------
# configuration and API misuse

BAD_CONFIGS = [
    # field, value, other settings, words of the fix that the message must contain
    ("bits", 16, {}, "it must lie in [min_bits, max_bits] = [0, 8]"),
    ("bits", 9, {}, "it must lie in [min_bits, max_bits] = [0, 8]"),
    ("bits", -1, {}, "it must lie in [min_bits, max_bits]"),
    ("bits", 2, {"min_bits": 3}, "it must lie in [min_bits, max_bits] = [3, 8]"),
    ("bits", "2", {}, "it must be a finite number such as 2, 2.25 or 3"),
    ("bits", float("nan"), {}, "it must be a finite number"),
    ("bits", float("inf"), {}, "it must be a finite number"),
    ("bits", True, {}, "it must be a finite number"),
    ("bits", 2.5, {"allocation": "uniform"}, "uniform allocation needs an integer bitwidth"),
    ("bits", 0.5, {"allocation": "measured"}, "needs bits >= 1"),
    ("max_bits", 16, {}, "it must lie in [1, 15] (the bitwidth header has 4 bits)"),
    ("max_bits", 0, {}, "it must lie in [1, 15]"),
    ("max_bits", 3.0, {}, "it must be an integer"),
    ("min_bits", -1, {}, "it must lie in [0, 15]"),
    ("min_bits", 9, {}, "it must not exceed max_bits=8"),
    ("allocation", "gptq", {}, "use one of ['baq', 'grid', 'paper', 'measured', 'uniform']"),
    ("clip_search", "yes", {}, "it must be True or False"),
    ("budget", "global", {}, "use one of ['layer', 'model']"),
    ("budget", "model", {"allocation": "uniform", "bits": 3}, "use allocation 'baq' or 'grid'"),
    ("budget_weighting", "hessian", {"budget": "model"}, "use one of ['fisher', 'relative']"),
    ("budget_measurement", 5, {"budget": "model"}, "give a file path or None"),
    ("allocation", None, {}, "use one of"),
    ("group_size", 0, {}, "use -1 (one range per row) or a positive group width"),
    ("group_size", -2, {}, "use -1 (one range per row)"),
    ("group_size", 1.5, {}, "it must be an integer"),
    ("block_size", 0, {}, "use a positive width such as 128"),
    ("damp_percent", 0, {}, "it must lie in (0, 1]; the paper uses 0.01"),
    ("damp_percent", 1.5, {}, "it must lie in (0, 1]"),
    ("damp_percent", float("nan"), {}, "it must lie in (0, 1]"),
    ("damp_percent", "0.01", {}, "it must be a number in (0, 1]"),
    ("num_samples", 0, {}, "use at least 1 calibration window"),
    ("num_samples", 1.5, {}, "it must be an integer"),
    ("seqlen", 1, {}, "use at least 2 tokens per window"),
    ("seqlen", "2048", {}, "it must be an integer"),
    ("seed", "0", {}, "it must be an integer"),
    ("sym", "yes", {}, "it must be True or False"),
    ("act_order", 1, {}, "it must be True or False"),
    ("true_sequential", None, {}, "it must be True or False"),
    ("compare_uniform", "no", {}, "it must be True or False"),
    ("resume_dir", 3, {}, "give a folder path or None"),
    ("modules_to_not_convert", "lm_head", {}, "give a list of module names"),
    ("modules_to_not_convert", [1], {}, "give a list of module names"),
    ("dataset", 42, {}, "give a path to a .txt/.jsonl file, a list of strings, or token ids"),
    ("tokenizer", 42, {}, "a tokenizer name or folder path (str), or a tokenizer object such as"),
    ("tokenizer", ["gpt2"], {}, "AutoTokenizer.from_pretrained(...) (callable, with .encode)"),
]


@pytest.mark.parametrize(
    ("field", "value", "others", "fix"),
    BAD_CONFIGS,
    ids=[f"{f}={v!r}{'+' + ','.join(o) if o else ''}" for f, v, o, _ in BAD_CONFIGS],
)
def test_invalid_config_value_names_field_value_and_fix(field, value, others, fix):
    with pytest.raises(ValueError) as err:
        BaqConfig(**{field: value}, **others)
    message = str(err.value)
    assert f"BaqConfig.{field}={value!r} is invalid" in message
    assert fix in message


def test_unknown_config_field_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bitz'\]; valid fields are \[.*'bits'"):
        BaqConfig(bitz=3)


def test_group_size_not_dividing_in_features_fails_at_plan_time(monkeypatch):
    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started before the plan was checked")

    monkeypatch.setattr(calibration, "capture_block_inputs", no_calibration)
    message = r"group_size=48 does not divide in_features=64 of model\.layers\.0\.self_attn\.q_proj; choose"
    with pytest.raises(ValueError, match=message):
        plan_quantization(tiny_model("llama"), BaqConfig(group_size=48))
    with pytest.raises(ValueError, match=message):
        quantize(tiny_model("llama"), group_size=48)


def test_text_calibration_without_a_tokenizer_is_rejected(tiny_checkpoints):
    config = BaqConfig(bits=2, dataset=["w1 w2 w3 " * 50], num_samples=2, seqlen=16)
    with pytest.raises(ValueError, match=r"BaqConfig\.tokenizer is needed to tokenize text calibration data"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=config)


def test_calibration_text_shorter_than_one_window_is_rejected(tiny_checkpoints):
    config = BaqConfig(bits=2, dataset=["w1 w2 w3"], tokenizer=word_tokenizer(), num_samples=2, seqlen=16)
    with pytest.raises(
        ValueError, match=r"3 tokens, fewer than one window of seqlen=16: give more text or lower"
    ):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=config)


def test_text_calibration_with_a_tokenizer_object_works(tiny_checkpoints):
    text = " ".join(f"w{i % 97}" for i in range(400))
    config = BaqConfig(bits=2, dataset=[text], tokenizer=word_tokenizer(), num_samples=2, seqlen=16)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=config)
    assert sum(isinstance(m, BaqLinear) for m in model.modules()) == 14


# ----------------------------------------------------------------------------------------------
# numerically hostile models


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_in_a_block_names_the_layer(bad):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    with pytest.raises(
        ValueError, match=r"weights of layer 'model\.layers\.1\.mlp\.up_proj' contain NaN or inf"
    ):
        quantize(model)


def test_non_finite_activations_name_the_first_layer_that_sees_them():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = float("inf")
    with pytest.raises(ValueError, match=rf"calibration inputs of layer '{Q}' contain NaN or inf"):
        quantize(model)


def test_zero_rows_zero_columns_and_dead_inputs(tmp_path):
    model = tiny_model("llama")
    layer0 = model.model.layers[0]
    with torch.no_grad():
        layer0.self_attn.q_proj.weight[5, :] = 0  # an all-zero row
        layer0.self_attn.q_proj.weight[:, 7] = 0  # an all-zero column (its input is alive)
        layer0.mlp.down_proj.weight.zero_()  # an all-zero layer: every row's range is degenerate
        layer0.input_layernorm.weight[[3, 11]] = 0  # inputs 3 and 11 of q/k/v are always 0: dead
    quantize(model)
    q = layer0.self_attn.q_proj
    w = q.dequantize()
    assert torch.isfinite(w).all()
    assert torch.all(w[5] == 0)
    assert torch.all(layer0.mlp.down_proj.dequantize() == 0)
    for dead in (3, 11):
        assert q.column_bits()[dead] == 0 and torch.all(w[:, dead] == 0)
    assert q.code_bits == pytest.approx(2.5, abs=1 / 64)
    save_quantized(model, tmp_path / "q")
    assert_reload_exact(model, tmp_path / "q")


def test_hessian_not_positive_definite_retries_with_more_damping(monkeypatch, caplog):
    cholesky = torch.linalg.cholesky
    calls = {"n": 0}

    def flaky(a, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # the very first factorization (q_proj of block 0) fails once
            raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")
        return cholesky(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky", flaky)
    with caplog.at_level(logging.WARNING, logger="baq_hf.gptq"):
        quantize(tiny_model("llama"))
    assert f"layer {Q}: Hessian not positive definite, retrying with damping" in caplog.text


def test_hessian_that_never_factors_gives_a_clear_error(monkeypatch):
    def never(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")

    monkeypatch.setattr(torch.linalg, "cholesky", never)
    message = rf"the Hessian of layer '{Q}' is not positive definite even with damping .*larger damp_percent"
    with pytest.raises(ValueError, match=message):
        quantize(tiny_model("llama"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_quantize_and_reload_exactly(tiny_checkpoints, tmp_path, dtype):
    config = BaqConfig(bits=2.5, dataset=calibration_ids(), num_samples=8, seqlen=32, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoints["llama"], dtype=dtype, quantization_config=config
    )
    layers = [m for m in model.modules() if isinstance(m, BaqLinear)]
    assert len(layers) == 14 and all(m.range_min.dtype == torch.float16 for m in layers)
    assert model.model.norm.weight.dtype == dtype
    save_quantized(model, tmp_path / "q")
    reloaded = assert_reload_exact(model, tmp_path / "q", dtype=dtype)
    assert reloaded.model.norm.weight.dtype == dtype


@pytest.mark.parametrize(
    ("hidden", "intermediate", "heads", "kv_heads", "group_size"),
    [(40, 45, 4, 2, -1), (40, 45, 4, 2, 5), (36, 52, 2, 1, 4)],
    ids=["40x45", "40x45-g5", "36x52-g4"],
)
def test_in_features_not_a_multiple_of_8_or_32(tmp_path, hidden, intermediate, heads, kv_heads, group_size):
    model = tiny_model(
        "llama",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    quantize(model, group_size=group_size, act_order=True)
    sizes = {m.in_features for m in model.modules() if isinstance(m, BaqLinear)}
    assert sizes == {hidden, intermediate}
    save_quantized(model, tmp_path / "q")
    assert_reload_exact(model, tmp_path / "q")


# ----------------------------------------------------------------------------------------------
# untrusted checkpoints


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A grouped BAQ checkpoint of the tiny LLaMA (group_index present)."""
    model = tiny_model("llama")
    quantize(model, group_size=32, act_order=True)
    path = tmp_path_factory.mktemp("baq-saved") / "q"
    save_quantized(model, path)
    return path


def edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), {"format": "pt"})


def _set(key, fn):
    def edit(t):
        t[key] = fn(t[key].clone())

    return edit


def _assign(key, index, value):
    def fn(t):
        t[index] = value
        return t

    return _set(key, fn)


def _rename_layer(old, new):
    def edit(t):
        for k in [k for k in t if k.startswith(old + ".")]:
            t[new + k[len(old) :]] = t.pop(k)

    return edit


def _mismatched_ranges(t):
    t[f"{Q}.range_min"] = torch.zeros(64, 3, dtype=torch.float16)


def _add_bias(t):
    t[f"{Q}.bias"] = torch.zeros(64, dtype=torch.float32)


def _drop_codes(t):
    del t[f"{Q}.weight"]


CORRUPTIONS = {
    # name: (edit of the tensors, pattern the error must match)
    "header claims more bits than the data holds": (
        _set(f"{Q}.bits_header", lambda h: torch.full_like(h, 0x88)),
        rf"layer '{Q}': qweight \(stored as {Q}\.weight\) has \d+ words but the bits_header needs \d+",
    ),
    "header widths not sorted": (
        _assign(f"{Q}.bits_header", 0, 0x0F),
        rf"layer '{Q}': bits_header: stored column bitwidths must be sorted",
    ),
    "perm repeats a column": (
        _set(f"{Q}.perm", lambda p: torch.cat([p[:1], p[:-1]])),
        rf"layer '{Q}': perm is not a permutation of the input columns",
    ),
    "perm points outside": (_assign(f"{Q}.perm", 0, 10**6), rf"layer '{Q}': perm is not a permutation"),
    "range NaN": (
        _assign(f"{Q}.range_min", (0, 0), float("nan")),
        rf"layer '{Q}': range_min/range_max contain NaN or inf",
    ),
    "range inf": (
        _assign(f"{Q}.range_max", (3, 1), float("inf")),
        rf"layer '{Q}': range_min/range_max contain",
    ),
    "range max <= min": (
        _set(f"{Q}.range_max", lambda r: torch.full_like(r, -1.0)),
        rf"layer '{Q}': range_max must exceed range_min in every row",
    ),
    "group_index too large": (
        _assign(f"{Q}.group_index", 0, 2),
        rf"layer '{Q}': group_index points outside the stored groups",
    ),
    "group_index negative": (_assign(f"{Q}.group_index", 5, -1), rf"layer '{Q}': group_index points outside"),
    "perm stored as int64": (
        _set(f"{Q}.perm", lambda p: p.long()),
        rf"layer '{Q}': perm has dtype torch\.int64, expected torch\.int32",
    ),
    "bits_header stored as int8": (
        _set(f"{Q}.bits_header", lambda h: h.view(torch.int8)),
        rf"layer '{Q}': bits_header has dtype torch\.int8, expected torch\.uint8",
    ),
    "perm shorter than in_features": (
        _set(f"{Q}.perm", lambda p: p[:60]),
        rf"checkpoint tensor {Q}\.perm has shape \(60,\), but the model's {Q} has in_features=64 .*"
        "checkpoint and config.json disagree",
    ),
    "range_min and range_max shapes differ": (
        _mismatched_ranges,
        rf"checkpoint tensors {Q}\.range_min/range_max have shapes \(64, 3\)/\(64, 2\)",
    ),
    "packed codes missing": (_drop_codes, rf"checkpoint tensor {Q}\.weight \(the packed codes\) is missing"),
    "bias the model does not have": (
        _add_bias,
        rf"checkpoint tensor {Q}\.bias is present, but the model's {Q} has no bias",
    ),
    "layer the model does not have": (
        _rename_layer(Q, "model.layers.9.self_attn.q_proj"),
        r"the checkpoint quantizes 'model\.layers\.9\.self_attn\.q_proj', which this model does not have",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_fails_naming_tensor_and_layer(saved, tmp_path, case):
    edit, pattern = CORRUPTIONS[case]
    folder = tmp_path / "bad"
    shutil.copytree(saved, folder)
    edit_tensors(folder, edit)
    with pytest.raises(ValueError, match=pattern):
        AutoModelForCausalLM.from_pretrained(folder)


def test_config_json_disagreeing_with_the_tensors_is_rejected(saved, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 80
    (folder / "config.json").write_text(json.dumps(config))
    pattern = r"checkpoint tensor model\.layers\.0\.mlp\.down_proj\.perm has shape \(96,\), .*in_features=80"
    with pytest.raises(ValueError, match=pattern):
        AutoModelForCausalLM.from_pretrained(folder)


def test_truncated_safetensors_file_is_rejected(saved, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(saved, folder)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        ValueError, match=r"model\.safetensors is not a readable safetensors file .*truncated"
    ):
        AutoModelForCausalLM.from_pretrained(folder)


def test_pickle_checkpoint_is_refused_without_unpickling(saved, tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    shutil.copytree(saved, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is not a safetensors file; baq_hf loads only"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_missing_shard_is_detected(tmp_path):
    model = tiny_model("llama")
    quantize(model)
    save_quantized(model, tmp_path / "q", max_shard_size="40KB")
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    (tmp_path / "q" / shards[-1]).unlink()
    with pytest.raises(OSError, match=shards[-1]):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


# ----------------------------------------------------------------------------------------------
# determinism


def test_same_inputs_give_byte_identical_checkpoints(tiny_checkpoints, tmp_path):
    outs = []
    for run in range(2):
        config = BaqConfig(bits=2.25, dataset=calibration_ids(), num_samples=8, seqlen=32, act_order=True)
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["opt"], quantization_config=config)
        outs.append(save_quantized(model, tmp_path / f"run{run}"))
    for name in ("model.safetensors", "config.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


# ----------------------------------------------------------------------------------------------
# resumable quantization


def interrupt_at_block(monkeypatch, block: int) -> None:
    real = calibration.quantize_block
    calls = {"n": 0}

    def quantize_block(*args, **kwargs):
        if calls["n"] == block:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "quantize_block", quantize_block)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_interrupted_run_resumes_to_a_bit_identical_result(tmp_path, monkeypatch, arch):
    settings = dict(group_size=32, act_order=True) if arch == "llama" else {}
    reference = tiny_model(arch)
    ref_report = quantize(reference, **settings)

    resume_dir = tmp_path / "state"
    interrupt_at_block(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_model(arch), resume_dir=str(resume_dir), **settings)
    state = json.loads((resume_dir / STATE_FILE).read_text())
    assert state["blocks_done"] == 1 and not state["complete"]
    names = sorted(p.name for p in resume_dir.iterdir())
    assert names == [STATE_FILE, "block_00000.safetensors", "hidden_00001.safetensors"]

    monkeypatch.undo()
    resumed = tiny_model(arch)
    report = quantize(resumed, resume_dir=str(resume_dir), **settings)
    assert_same_state(reference, resumed)
    assert report["layers"].keys() == ref_report["layers"].keys()
    assert json.loads((resume_dir / STATE_FILE).read_text())["complete"]


def test_resume_through_from_pretrained(tiny_checkpoints, tmp_path, monkeypatch):
    def config(**kw):
        return BaqConfig(bits=2.5, dataset=calibration_ids(), num_samples=8, seqlen=32, **kw)

    path = tiny_checkpoints["llama"]
    reference = AutoModelForCausalLM.from_pretrained(path, quantization_config=config())
    interrupt_at_block(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=config(resume_dir=str(tmp_path)))
    monkeypatch.undo()
    resumed = AutoModelForCausalLM.from_pretrained(path, quantization_config=config(resume_dir=str(tmp_path)))
    assert_same_state(reference, resumed)


def test_finished_state_is_reused_without_calibration(tmp_path, monkeypatch):
    reference = tiny_model("llama")
    quantize(reference, resume_dir=str(tmp_path / "state"))
    interrupt_at_block(monkeypatch, 0)  # any call to quantize_block would raise
    again = tiny_model("llama")
    quantize(again, resume_dir=str(tmp_path / "state"))
    assert_same_state(reference, again)


def test_interruption_before_the_first_state_file_restarts_cleanly(tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_write_json", killed)  # dies after block 0's tensors, before its JSON
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_model("llama"), resume_dir=str(tmp_path / "state"))
    assert not (tmp_path / "state" / STATE_FILE).exists()
    monkeypatch.undo()
    resumed = tiny_model("llama")
    quantize(resumed, resume_dir=str(tmp_path / "state"))
    reference = tiny_model("llama")
    quantize(reference)
    assert_same_state(reference, resumed)


@pytest.mark.parametrize(
    ("change", "differs"),
    [
        ({"bits": 3}, "config"),
        ({"windows_seed": 1}, "calibration_windows"),
        ({"arch": "opt"}, "model_class"),
    ],
    ids=["settings", "calibration", "model"],
)
def test_resume_state_of_another_run_is_refused(tmp_path, monkeypatch, change, differs):
    interrupt_at_block(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_model("llama"), resume_dir=str(tmp_path / "state"))
    monkeypatch.undo()
    model = tiny_model(change.get("arch", "llama"))
    config = BaqConfig(
        bits=change.get("bits", 2.5), num_samples=8, seqlen=32, resume_dir=str(tmp_path / "state")
    )
    message = (
        rf"holds the state of a different quantization run \(it differs in: .*{differs}.*\); clear the folder"
    )
    with pytest.raises(ValueError, match=message):
        quantize_model(model, windows(8, seed=change.get("windows_seed", 0)), config, progress=False)


def test_resume_dir_with_foreign_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are not a BAQ resume state \(notes\.txt\)"):
        quantize(tiny_model("llama"), resume_dir=str(tmp_path))


def test_damaged_resume_state_is_reported(tmp_path, monkeypatch):
    interrupt_at_block(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_model("llama"), resume_dir=str(tmp_path / "state"))
    monkeypatch.undo()
    block = tmp_path / "state" / "block_00000.safetensors"
    block.write_bytes(block.read_bytes()[:100])
    with pytest.raises(
        ValueError, match=r"is damaged: block_00000\.safetensors cannot be read .*clear the folder"
    ):
        quantize(tiny_model("llama"), resume_dir=str(tmp_path / "state"))


# ----------------------------------------------------------------------------------------------
# atomic saving


@pytest.fixture(scope="module")
def quantized_llama() -> nn.Module:
    model = tiny_model("llama")
    quantize(model)
    return model


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_save_quantized_writes_a_complete_folder(quantized_llama, tmp_path):
    out = save_quantized(
        quantized_llama, tmp_path / "q", tokenizer=word_tokenizer(), extra_files={"README.md": "# tiny\n"}
    )
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert INCOMPLETE_MARKER not in names and leftovers(tmp_path) == []
    assert_reload_exact(quantized_llama, out)


def failing_safetensors_writer(monkeypatch):
    """Make the weight writer of save_pretrained write half a file and then fail (a full disk)."""
    import transformers.modeling_utils as mu

    real = mu.safe_save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mu, "safe_save_file", half_then_fail)


def test_interrupted_save_leaves_no_folder(quantized_llama, tmp_path, monkeypatch):
    failing_safetensors_writer(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_quantized(quantized_llama, tmp_path / "q")
    assert not (tmp_path / "q").exists() and leftovers(tmp_path) == []


def test_interrupted_save_keeps_the_previous_folder(quantized_llama, tmp_path, monkeypatch):
    out = save_quantized(quantized_llama, tmp_path / "q")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    failing_safetensors_writer(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_quantized(quantized_llama, tmp_path / "q")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    assert_reload_exact(quantized_llama, out)


def test_saving_over_a_folder_replaces_it_whole(quantized_llama, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "stale.txt").write_text("old")
    save_quantized(quantized_llama, tmp_path / "q")
    assert not (tmp_path / "q" / "stale.txt").exists() and leftovers(tmp_path) == []


def test_folder_left_by_a_killed_save_does_not_load(quantized_llama, tmp_path, monkeypatch):
    def killed(folder):
        raise KeyboardInterrupt  # everything is written, the marker is still there

    monkeypatch.setattr(ckpt, "_check_saved_folder", killed)
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)  # a SIGKILL cleans nothing up
    with pytest.raises(KeyboardInterrupt):
        save_quantized(quantized_llama, tmp_path / "q")
    monkeypatch.undo()
    (left,) = [tmp_path / n for n in leftovers(tmp_path)]
    assert (left / "model.safetensors").exists() and (left / INCOMPLETE_MARKER).exists()
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match=r"is an incomplete save \(it still holds \.baq_incomplete\)"):
        AutoModelForCausalLM.from_pretrained(left)


@pytest.mark.parametrize("name", ["../escape.txt", "/abs.txt", "sub/dir.txt", "", INCOMPLETE_MARKER])
def test_extra_file_names_must_be_plain(quantized_llama, tmp_path, name):
    with pytest.raises(ValueError, match="must be a plain file name"):
        save_quantized(quantized_llama, tmp_path / "q", extra_files={name: "x"})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# what will and will not be quantized, reported up front


class GatedMix(nn.Module):
    """A custom module with a child Linear and a 2-D parameter of its own (not quantizable)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.mix = nn.Parameter(torch.zeros(4, 64))


def test_unsupported_layers_in_blocks_are_reported_before_calibration(monkeypatch, caplog):
    model = tiny_model("llama")
    model.model.layers[0].conv = nn.Conv2d(2, 2, 3)  # never called by the block
    model.model.layers[1].gated = GatedMix()
    model.model.layers[1].table = nn.Embedding(10, 64)
    plan = plan_quantization(model, BaqConfig())
    assert plan.skipped["model.layers.0.conv"] == "unsupported layer type Conv2d"
    assert plan.skipped["model.layers.1.gated"] == "unsupported layer type GatedMix"
    assert plan.skipped["model.layers.1.table"] == "unsupported layer type Embedding"
    assert "lm_head" in plan.skipped and "self_attn.q_proj" in plan.layers[0]
    assert "model.layers.0.conv (unsupported layer type Conv2d)" in plan.summary()

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(calibration, "capture_block_inputs", stop)
    with caplog.at_level(logging.INFO, logger="baq_hf.calibration"), pytest.raises(Stop):
        quantize(model)
    assert "model.layers.1.gated (unsupported layer type GatedMix)" in caplog.text


def test_model_without_a_block_list_gives_a_clear_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    message = r"Sequential has no block list \(nn\.ModuleList\) holding Linear or Conv1D layers"
    with pytest.raises(ValueError, match=message):
        plan_quantization(model, BaqConfig())
    with pytest.raises(ValueError, match=message):
        quantize_model(model, windows(), BaqConfig(num_samples=8, seqlen=32), progress=False)


@pytest.mark.parametrize(
    ("num_samples", "allocation", "warns"),
    [(2, "baq", True), (2, "uniform", False), (8, "baq", False)],
    ids=["64-tokens-baq", "64-tokens-uniform", "256-tokens-baq"],
)
def test_too_few_calibration_tokens_for_the_widest_layer_warns(caplog, num_samples, allocation, warns):
    """Tiny LLaMA: down_proj has 96 inputs; 2 x 32 tokens leave its Hessian rank-deficient."""
    with caplog.at_level(logging.WARNING, logger="baq_hf.calibration"):
        quantize(tiny_model("llama"), bits=2, num_samples=num_samples, allocation=allocation)
    message = "calibration has 64 tokens (num_samples x seqlen) for layers with up to 96 inputs"
    assert (message in caplog.text) is warns
