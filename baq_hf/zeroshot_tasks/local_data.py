"""Datasets of the local zero-shot tasks, read from a folder laid out like the upstream releases.

lm-eval calls these as ``custom_dataset(**metadata, **dataset_kwargs)``; baq_hf passes the folder as
the ``task_data`` metadata. Each returns a ``datasets.DatasetDict`` holding the split the stock task
evaluates, with the stock (Hugging Face) field names, so the stock prompts apply unchanged. This file
is loaded by lm-eval from its path, so it imports nothing from baq_hf.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# task -> (split the stock task evaluates, files relative to the task-data folder)
LAYOUT: dict[str, tuple[str, tuple[str, ...]]] = {
    "piqa": ("validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst")),
    "arc_easy": ("test", ("arc_easy/test.json",)),
    "arc_challenge": ("test", ("arc_challenge/ARC-Challenge-test.jsonl",)),
    "lambada_openai": ("test", ("lambada_openai/lambada_test.jsonl",)),
    "winogrande": ("validation", ("winogrande/dev.jsonl",)),
}


def missing_files(task_data: str | Path, task: str) -> list[Path]:
    """The files of ``task`` that are not in ``task_data``."""
    return [Path(task_data) / rel for rel in LAYOUT[task][1] if not (Path(task_data) / rel).is_file()]


def _path(task_data: str | Path | None, task: str, index: int) -> Path:
    if task_data is None:
        raise ValueError(
            f"the local {task!r} task needs its data folder: pass task_data=... (baq-hf eval --task-data)"
        )
    path = Path(task_data) / LAYOUT[task][1][index]
    if not path.is_file():
        raise FileNotFoundError(
            f"{task}: {str(path)!r} not found; the task-data folder must hold {', '.join(LAYOUT[task][1])}"
        )
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    docs = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
    return docs


def _dataset(task: str, docs: list[dict[str, Any]]) -> Any:
    import datasets

    if not docs:
        raise ValueError(f"{task}: the data file holds no items")
    return datasets.DatasetDict({LAYOUT[task][0]: datasets.Dataset.from_list(docs)})


def piqa(task_data: str | None = None, **_: Any) -> Any:
    """PIQA validation: goal, sol1, sol2 from valid.jsonl and the integer ``label`` from valid-labels.lst."""
    docs = _read_jsonl(_path(task_data, "piqa", 0))
    label_path = _path(task_data, "piqa", 1)
    labels = label_path.read_text(encoding="utf-8").split()
    if len(labels) != len(docs) or not set(labels) <= {"0", "1"}:
        raise ValueError(
            f"piqa: {label_path} must hold one label (0 or 1) per item of valid.jsonl "
            f"({len(docs)} items, {len(labels)} labels)"
        )
    return _dataset("piqa", [{**doc, "label": int(label)} for doc, label in zip(docs, labels, strict=True)])


def arc_easy(task_data: str | None = None, **_: Any) -> Any:
    """ARC-Easy test, a JSON array in the Hugging Face ai2_arc schema."""
    path = _path(task_data, "arc_easy", 0)
    docs = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(docs, list):
        raise ValueError(f"arc_easy: {path} must hold a JSON array of questions")
    return _dataset("arc_easy", docs)


def arc_challenge(task_data: str | None = None, **_: Any) -> Any:
    """ARC-Challenge test, JSON lines in the Hugging Face ai2_arc schema."""
    return _dataset("arc_challenge", _read_jsonl(_path(task_data, "arc_challenge", 0)))


def lambada_openai(task_data: str | None = None, **_: Any) -> Any:
    """LAMBADA as released by OpenAI (the data behind EleutherAI/lambada_openai's default config)."""
    return _dataset("lambada_openai", _read_jsonl(_path(task_data, "lambada_openai", 0)))


def winogrande(task_data: str | None = None, **_: Any) -> Any:
    """WinoGrande 1.1 dev (the validation split of winogrande_xl), answer "1" or "2" in each line."""
    return _dataset("winogrande", _read_jsonl(_path(task_data, "winogrande", 0)))


# The stock winogrande prompt (lm_eval/tasks/winogrande/preprocess_winogrande.py): the context is the
# sentence up to the blank with either option filled in, the continuation is the rest of the sentence.


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    blank = doc["sentence"].index("_") + 1
    return doc["sentence"][blank:].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
