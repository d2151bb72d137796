"""Zero-shot evaluation: baq-hf's lm-eval runs equal lm-eval's own, and the local tasks are the stock ones.

A tiny random LLaMA (and its 128-token tokenizer) runs on 10 synthetic items per task, written in the
layout of the upstream releases; the comparison of prompts also runs on the real copies of the five
evaluation sets when the repository's shared/data/zeroshot is present.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from baq_hf import BaqConfig, BaqLinear, cli, data
from baq_hf.zeroshot import (
    LOCAL_TASKS,
    TASKS_DIR,
    check_tasks,
    evaluate_zeroshot,
    write_stock_reference_tasks,
)

from .conftest import SHARED_DATA, calibration_ids, tiny_model
from .test_cli import make_tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="the zeroshot extra is absent: pip install -e '.[zeroshot]'")
simple_evaluate = lm_eval.simple_evaluate
TaskManager = pytest.importorskip("lm_eval.tasks").TaskManager

pytestmark = pytest.mark.usefixtures("single_thread")

ITEMS = 10
ALL_TASKS = ",".join(LOCAL_TASKS)


def write_task_data(folder: Path, n: int = ITEMS) -> Path:
    """``n`` items per task in the upstream file formats (PIQA's labels in their own file)."""
    words = data.default_calibration_text().split()
    files = {
        "piqa/valid.jsonl": [
            {"goal": f"how to clean pot {i}", "sol1": "use water and soap", "sol2": "use sand and glue"}
            for i in range(n)
        ],
        "arc_challenge/ARC-Challenge-test.jsonl": [
            {
                "id": f"c{i}",
                "question": f"which one is a color, case {i}?",
                "choices": {
                    "text": ["red", "dog", "car", "sun"][: 3 + i % 2],
                    "label": ["1", "2", "3", "4"][: 3 + i % 2],
                },
                "answerKey": str(1 + i % 3),
            }
            for i in range(n)
        ],
        "lambada_openai/lambada_test.jsonl": [
            {"text": " ".join(words[20 * i : 20 * i + 20])} for i in range(n)
        ],
        "winogrande/dev.jsonl": [
            {
                "qID": f"q{i}",
                "sentence": f"anna gave bob book {i} because _ was kind.",
                "option1": "anna",
                "option2": "bob",
                "answer": "12"[i % 2],
            }
            for i in range(n)
        ],
    }
    for relative, docs in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text("\n".join(json.dumps(d) for d in docs) + "\n", encoding="utf-8")
    (folder / "piqa/valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(n)), encoding="utf-8")
    arc_easy = [
        {
            "id": f"e{i}",
            "question": f"what do plants need, case {i}?",
            "choices": {"text": ["light", "rock", "metal", "plastic"], "label": ["A", "B", "C", "D"]},
            "answerKey": "ABCD"[i % 4],
        }
        for i in range(n)
    ]
    (folder / "arc_easy").mkdir(exist_ok=True)
    (folder / "arc_easy/test.json").write_text(json.dumps(arc_easy, indent=1), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> Path:
    return write_task_data(tmp_path_factory.mktemp("task-data"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A float tiny LLaMA and its tokenizer; positions enough for the longest synthetic prompt."""
    folder = tmp_path_factory.mktemp("tiny-fp")
    tiny_model("llama", max_position_embeddings=512).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def shared_task_data() -> Path | None:
    if SHARED_DATA is not None and (SHARED_DATA / "zeroshot").is_dir():
        return SHARED_DATA / "zeroshot"
    return None


def load_tasks(include_path: Path, folder: Path) -> dict:
    manager = TaskManager(
        include_path=str(include_path), include_defaults=False, metadata={"task_data": str(folder)}
    )
    return manager.load(list(LOCAL_TASKS))["tasks"]


# Config fields that may differ: the data source, the splits (the evaluated one is compared below; the
# others only feed few-shot examples), the prompt fields (compared on every document below) and metadata.
DATA_FIELDS = {
    "custom_dataset", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
    "validation_split", "test_split", "fewshot_split", "fewshot_config", "doc_to_text", "doc_to_target",
    "doc_to_choice", "metadata", "tag",
}  # fmt: skip
# Full split sizes (shared/data/zeroshot/SOURCES.md); prompts are compared on every 25th item of the real
# data (rendering the templates takes milliseconds per item; all items were compared once, identical).
FULL_SIZES = {
    "piqa": 1838,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "lambada_openai": 5153,
    "winogrande": 1267,
}
SHARED_STRIDE = 25


@pytest.mark.parametrize("source", ["synthetic", "shared"])
def test_local_tasks_are_the_stock_tasks_on_local_data(source, task_data, tmp_path):
    folder = task_data if source == "synthetic" else shared_task_data()
    if folder is None:
        pytest.skip("shared/data/zeroshot not found (set BAQ_HF_DATA_DIR to the shared data folder)")
    ours = load_tasks(TASKS_DIR, folder)
    stock = load_tasks(write_stock_reference_tasks(tmp_path), folder)
    for name in LOCAL_TASKS:
        a, b = ours[name], stock[name]
        config_a, config_b = a.config.to_dict(), b.config.to_dict()
        assert {k: v for k, v in config_a.items() if k not in DATA_FIELDS} == {
            k: v for k, v in config_b.items() if k not in DATA_FIELDS
        }, name
        assert config_a["metadata"]["version"] == config_b["metadata"]["version"]
        assert (a.has_test_docs(), a.config.test_split or a.config.validation_split) == (
            b.has_test_docs(),
            b.config.test_split or b.config.validation_split,
        )
        docs = list(a.eval_docs)
        assert docs == list(b.eval_docs)
        if source == "shared":
            assert len(docs) == FULL_SIZES[name]
        for doc in docs[:: SHARED_STRIDE if source == "shared" else 1]:
            assert a.fewshot_context(doc, 0) == b.fewshot_context(doc, 0)
            assert a.doc_to_target(doc) == b.doc_to_target(doc)
            if a.OUTPUT_TYPE == "multiple_choice":
                assert a.doc_to_choice(doc) == b.doc_to_choice(doc)


def test_cli_scores_equal_lm_evals_own_run(tiny_folder, task_data, tmp_path, capsys):
    """baq-hf eval on the local tasks == lm-eval's simple_evaluate loading the same folder, stock tasks."""
    out = tmp_path / "zeroshot.json"
    argv = ["eval", str(tiny_folder), "--tasks", ALL_TASKS, "--task-data", str(task_data), "--device", "cpu"]
    assert cli.main([*argv, "--output", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in LOCAL_TASKS) and "acc_norm" in table and "perplexity" in table
    ours = json.loads(out.read_text())
    reference = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_folder), "dtype": "float32"},
        tasks=list(LOCAL_TASKS),
        num_fewshot=0,
        batch_size=16,
        device="cpu",
        log_samples=False,
        task_manager=TaskManager(
            include_path=str(write_stock_reference_tasks(tmp_path / "stock")),
            include_defaults=False,
            metadata={"task_data": str(task_data)},
        ),
    )
    for name in LOCAL_TASKS:
        expected = {
            key.partition(",")[0]: value
            for key, value in reference["results"][name].items()
            if key.endswith(",none") and isinstance(value, float)
        }
        assert ours["metrics"][name] == expected, name
        assert set(expected) >= {"acc", "acc_stderr"}
        assert ours["n_items"][name] == ITEMS
    assert set(ours["metrics"]["lambada_openai"]) == {"acc", "acc_stderr", "perplexity", "perplexity_stderr"}
    settings = ours["settings"]
    assert settings["num_fewshot"] == 0 and settings["batch_size"] == 16 and settings["limit"] is None
    assert settings["device"] == "cpu" and settings["dtype"] == "float32"
    assert ours["versions"]["lm_eval"] and ours["versions"]["torch"] == torch.__version__


def test_baq_model_scores_are_the_same_dequantized_or_not(tiny_folder, task_data, tmp_path, capsys):
    """The CLI dequantizes BaqLinear once on the CPU for speed; the scores equal the packed model's up
    to fp32 rounding (the packed layers' CPU product regroups the dense matmul's sums)."""
    tokenizer = make_tokenizer()
    config = BaqConfig(bits=3, dataset=calibration_ids(8, 32), num_samples=8, seqlen=32)
    quantized = AutoModelForCausalLM.from_pretrained(tiny_folder, quantization_config=config)
    folder = tmp_path / "baq"
    quantized.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    argv = [
        "eval",
        str(folder),
        "--tasks",
        "piqa,lambada_openai",
        "--task-data",
        str(task_data),
        "--limit",
        "3",
    ]
    assert cli.main([*argv, "--json", "--no-progress"]) == 0
    via_cli = json.loads(capsys.readouterr().out)
    packed = AutoModelForCausalLM.from_pretrained(folder)
    assert any(isinstance(m, BaqLinear) for m in packed.modules())
    direct = evaluate_zeroshot(packed, tokenizer, ["piqa", "lambada_openai"], task_data=task_data, limit=3)
    assert via_cli["metrics"].keys() == direct.metrics.keys()
    for task, metrics in direct.metrics.items():
        assert via_cli["metrics"][task] == pytest.approx(metrics, rel=1e-4), task
    assert via_cli["n_items"] == direct.n_items == {"piqa": 3, "lambada_openai": 3}
    assert via_cli["settings"]["limit"] == 3


def test_unknown_task_names_the_closest_ones(task_data, capsys):
    argv = ["eval", "no/such-model", "--tasks", "piqa,arc_eazy", "--task-data", str(task_data)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "unknown zero-shot task 'arc_eazy'" in err and "did you mean arc_easy" in err
    # online, names are checked against lm-eval's index (here of one stock folder: all takes 20 s)
    stock = TaskManager(
        include_path=str(Path(lm_eval.__file__).parent / "tasks" / "piqa"), include_defaults=False
    )
    assert check_tasks(["piqa"], None, stock) == ["piqa"]
    with pytest.raises(KeyError, match=r"'piqaa'; did you mean piqa\?.*stock tasks"):
        check_tasks(["piqaa"], None, stock)


def test_missing_data_file_fails_before_the_model_loads(task_data, tmp_path, capsys):
    partial = shutil.copytree(task_data, tmp_path / "partial")
    (partial / "winogrande" / "dev.jsonl").unlink()
    argv = ["eval", "no/such-model", "--tasks", "piqa,winogrande", "--task-data", str(partial)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "task data missing" in err and str(partial / "winogrande" / "dev.jsonl") in err
    assert cli.main([*argv[:-1], str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_without_lm_eval_the_error_gives_the_install_command(task_data, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    assert cli.main(["eval", "no/such-model", "--tasks", "piqa", "--task-data", str(task_data)]) == 1
    assert 'pip install "baq_hf[zeroshot]"' in capsys.readouterr().err
