"""Text loading, named evaluation sets and GPTQ-style calibration windows.

Calibration follows GPTQ: tokenize the text once and draw ``num_samples`` windows of ``seqlen``
tokens at seeded random starts. The default calibration text and the named evaluation sets
(WikiText-2 test, PTB test, a C4 evaluation slice) ship with the package (sources and licences in
``baq_hf/data/NOTICE.md``), so quantizing and evaluating work offline. Other text comes from a local
``.txt``/``.jsonl`` file or, with the optional ``datasets`` package, from a Hugging Face Hub dataset.
The library never looks for data outside itself.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    """A named evaluation text shipped gzip-compressed in ``baq_hf/data`` (sources in its NOTICE.md).

    ``sha256`` is the digest of the uncompressed file, which is read with universal newlines.
    """

    resource: str
    sha256: str
    description: str


EVAL_SETS: dict[str, EvalSet] = {
    "wikitext2": EvalSet(
        "wikitext2_test.txt.gz",
        "71fa921e51ba607b4364d8787d05f4513b41b33732dd3504ff1af8952c6e7e77",
        "WikiText-2 raw test, its rows joined with blank lines as GPTQ does",
    ),
    "ptb": EvalSet(
        "ptb_test.txt.gz",
        "91a2fa938d84baddaa05a3d67a5698924847eca8a4e7faa1518f3fd11c3d6d73",
        "Penn Treebank test (Mikolov's preprocessed ptb.test.txt)",
    ),
    "c4": EvalSet(
        "c4_eval.txt.gz",
        "54e79acbe4a422ed3e21f4ad2951c1910d7e9373c095ec502822bcd8b5d963b3",
        "C4 en validation documents 0-1099 joined with spaces",
    ),
}
# Shipped with the package: the first ~250 KB (whole documents) of the C4 calibration documents
# 1100-1999, disjoint from the C4 evaluation documents 0-1099.
DEFAULT_CALIBRATION_RESOURCE = "c4_calibration_sample.txt"
DATASETS_INSTALL_HINT = "pip install 'baq_hf[datasets]'"
# BAQ_HF_QUICK_TEST=1 cuts every calibration and evaluation to a few short windows, so that the
# documentation and examples run in seconds in CI (tests/test_docs.py); the numbers then mean nothing.
QUICK_TEST_ENV = "BAQ_HF_QUICK_TEST"
QUICK_TEST_WINDOWS = 2
QUICK_TEST_SEQLEN = 64
# owner/name, then optionally :config and @split (e.g. Salesforce/wikitext:wikitext-2-raw-v1@test)
_HUB_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.\[\]:%+-]+))?")

TextSource = str | os.PathLike | Sequence[str]
CalibrationData = str | os.PathLike | Sequence[str] | torch.Tensor | Sequence[Sequence[int]] | None


def _read_text_file(path: Path) -> str:
    return _decode_text(path.read_bytes())


def _decode_text(raw: bytes) -> str:
    """Decode UTF-8 with universal newlines, for files and shipped texts alike.

    ``\\r\\n`` becomes ``\\n``: the WikiText-2 test file has CRLF line ends, while GPTQ's text (and the
    reference perplexities) use plain ``\\n``; reading the raw bytes shifts SmolLM2's perplexity.
    """
    return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8").read()


def load_text(source: TextSource) -> str:
    """Return one text from a ``.txt`` file, a ``.jsonl`` file or a list of strings.

    A ``.jsonl`` file holds one JSON object per line with a ``"text"`` field; the texts are joined
    with ``"\\n\\n"``, as are the strings of a list. Any other file is read as UTF-8 text.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Text file not found: {str(path)!r}.")
        is_jsonl = path.suffix.lower() == ".jsonl"
        text = "\n\n".join(_jsonl_texts(path)) if is_jsonl else _read_text_file(path)
        where = str(path)
    elif isinstance(source, Sequence):
        if not all(isinstance(item, str) for item in source):
            raise TypeError("A list given as text must hold only strings.")
        text = "\n\n".join(source)
        where = "the given list of strings"
    else:
        raise TypeError(
            f"Expected a path to a .txt/.jsonl file or a list of strings, got {type(source).__name__}."
        )
    if not text.strip():
        raise ValueError(f"No text in {where}: it is empty or only whitespace.")
    return text


def _jsonl_texts(path: Path) -> Iterator[str]:
    """Yield the ``"text"`` field of every non-blank line, with the line number in any error."""
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}).") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(
                    f'{path}:{lineno}: each line must be a JSON object with a string "text" field.'
                )
            yield record["text"]


def _read_package_text(resource: str) -> str:
    """Read a text file shipped in ``baq_hf/data`` (gzip-compressed when it ends in ``.gz``)."""
    packed = resources.files("baq_hf").joinpath("data", resource).read_bytes()
    raw = gzip.decompress(packed) if resource.endswith(".gz") else packed
    return _decode_text(raw)


def eval_set_text(name: str) -> str:
    """The text of a named evaluation set (``wikitext2``, ``ptb``, ``c4``), shipped with the package.

    The uncompressed bytes are checked against the recorded SHA-256, so a damaged installation fails
    here instead of giving wrong perplexities.
    """
    if name not in EVAL_SETS:
        raise KeyError(f"Unknown evaluation set {name!r}; known: {', '.join(EVAL_SETS)}.")
    spec = EVAL_SETS[name]
    packed = resources.files("baq_hf").joinpath("data", spec.resource).read_bytes()
    raw = gzip.decompress(packed)
    if hashlib.sha256(raw).hexdigest() != spec.sha256:
        raise OSError(
            f"The evaluation set {name!r} shipped in baq_hf/data/{spec.resource} is damaged (SHA-256 "
            "mismatch); reinstall baq_hf."
        )
    return _decode_text(raw)


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a Hub dataset (``owner/name[:config][@split]``) rather than a file."""
    text = os.fspath(source)
    return _HUB_ID.fullmatch(text) is not None and Path(text).suffix.lower() not in (".txt", ".jsonl")


def hub_text(dataset_id: str, default_split: str) -> str:
    """The rows of a Hugging Face Hub dataset joined with blank lines (needs the ``datasets`` package).

    ``dataset_id`` is ``owner/name``, optionally followed by ``:config`` and ``@split`` (default
    ``default_split``); the ``text`` column is read, or the only string column when there is no
    ``text`` column.
    """
    match = _HUB_ID.fullmatch(dataset_id)
    if match is None:
        raise ValueError(f"{dataset_id!r} is not a Hub dataset id of the form owner/name[:config][@split].")
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"{dataset_id!r} names a Hugging Face Hub dataset; reading it needs the `datasets` package: "
            f"{DATASETS_INSTALL_HINT} (or give a local .txt/.jsonl file)."
        ) from exc
    repo, config, split = match["repo"], match["config"], match["split"] or default_split
    try:
        rows = datasets.load_dataset(repo, config, split=split)
    except Exception as exc:  # offline, unknown id or config, missing split: all mean "cannot read it"
        raise OSError(
            f"Could not load the Hub dataset {repo!r} (config {config!r}, split {split!r}): "
            f"{type(exc).__name__}: {exc}. Check the id (owner/name[:config][@split]) and the network "
            "connection, or give a local .txt/.jsonl file."
        ) from exc
    strings = [name for name, feature in rows.features.items() if getattr(feature, "dtype", None) == "string"]
    column = "text" if "text" in rows.column_names else (strings[0] if len(strings) == 1 else None)
    if column is None:
        raise ValueError(
            f"The Hub dataset {dataset_id!r} has no 'text' column and not exactly one string column "
            f"(columns: {', '.join(rows.column_names)}); save the text you want as a .txt file instead."
        )
    return "\n\n".join(rows[column])


def _text_from_source(source: str | os.PathLike, default_split: str) -> str:
    """A local .txt/.jsonl file, else a Hub dataset id; anything else is reported as a missing file."""
    path = Path(source).expanduser()
    if not path.is_file() and is_hub_id(source):
        return hub_text(os.fspath(source), default_split)
    return load_text(path)


def resolve_eval_text(name_or_path: str | os.PathLike) -> str:
    """Text of a named evaluation set (``wikitext2``, ``ptb``, ``c4``), a local file or a Hub dataset.

    Hub datasets (``owner/name[:config][@split]``, split ``test`` by default) need ``datasets``.
    """
    key = os.fspath(name_or_path)
    if key in EVAL_SETS:
        return eval_set_text(key)
    if Path(key).expanduser().is_file() or is_hub_id(key):
        return _text_from_source(key, default_split="test")
    raise FileNotFoundError(
        f"{key!r} is neither a named evaluation set ({', '.join(EVAL_SETS)}), nor an existing .txt/.jsonl "
        "file, nor a Hub dataset id (owner/name[:config][@split])."
    )


def default_calibration_text() -> str:
    """The calibration text shipped with the package (C4 validation docs 1100 onwards, ~250 KB)."""
    return _read_package_text(DEFAULT_CALIBRATION_RESOURCE)


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Tokenize a whole text once into a 1-D LongTensor, as GPTQ does.

    The tokenizer's default special tokens are kept and nothing is truncated.
    """
    # verbose=False silences the "longer than the model's maximum length" warning: we cut windows.
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def quick_test_sizes(num_windows: int | None, seqlen: int) -> tuple[int | None, int]:
    """``(num_windows, seqlen)``, cut to a few short windows while ``$BAQ_HF_QUICK_TEST`` is set."""
    if os.environ.get(QUICK_TEST_ENV, "") in ("", "0"):
        return num_windows, seqlen
    logger.warning(
        "%s is set: using at most %d windows of %d tokens instead of %s of %d (a quick test; results are "
        "not meaningful)",
        QUICK_TEST_ENV,
        QUICK_TEST_WINDOWS,
        QUICK_TEST_SEQLEN,
        num_windows if num_windows is not None else "all",
        seqlen,
    )
    capped = QUICK_TEST_WINDOWS if num_windows is None else min(num_windows, QUICK_TEST_WINDOWS)
    return capped, min(seqlen, QUICK_TEST_SEQLEN)


def _check_sizes(num_samples: int, seqlen: int) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(
            f"seqlen must be an integer >= 2 (a window needs an input and a target), got {seqlen!r}."
        )


def _is_token_ids(dataset: Any) -> bool:
    """Pre-tokenized input: a tensor, or a non-empty list whose items are lists/tensors (not str)."""
    if isinstance(dataset, torch.Tensor):
        return True
    if isinstance(dataset, (str, bytes, os.PathLike)) or not isinstance(dataset, Sequence) or not dataset:
        return False
    return all(not isinstance(row, (str, bytes)) for row in dataset)


def _rows_from_ids(dataset: torch.Tensor | Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Validate pre-tokenized ids and return them as 1-D LongTensor rows."""
    if isinstance(dataset, torch.Tensor):
        if dataset.is_floating_point() or dataset.is_complex() or dataset.dtype == torch.bool:
            raise ValueError(f"Token ids must be integers, got a {dataset.dtype} tensor.")
        if dataset.dim() == 1:
            dataset = dataset.unsqueeze(0)
        if dataset.dim() != 2:
            raise ValueError(f"Token ids must be a [n, L] tensor, got shape {tuple(dataset.shape)}.")
        rows = list(dataset.to(torch.long).cpu())
    else:
        rows = []
        for i, row in enumerate(dataset):
            if isinstance(row, torch.Tensor):
                if row.is_floating_point() or row.is_complex() or row.dtype == torch.bool or row.dim() != 1:
                    raise ValueError(f"Row {i} of the token ids must be a 1-D integer tensor.")
                rows.append(row.to(torch.long).cpu())
                continue
            if not isinstance(row, Sequence) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in row
            ):
                raise ValueError(f"Row {i} of the token ids must be a list of integers.")
            rows.append(torch.tensor(list(row), dtype=torch.long))
    if not rows:
        raise ValueError("The calibration dataset is empty: give text or at least one row of token ids.")
    for i, row in enumerate(rows):
        if row.numel() and int(row.min()) < 0:
            raise ValueError(f"Row {i} of the token ids holds negative ids.")
    return rows


def calibration_windows(
    dataset: CalibrationData,
    tokenizer: PreTrainedTokenizerBase | None,
    num_samples: int,
    seqlen: int,
    seed: int,
) -> torch.LongTensor:
    """Return ``num_samples`` calibration windows of ``seqlen`` tokens, shape ``[num_samples, seqlen]``.

    ``dataset``: ``None`` (the shipped C4 sample), a path to a ``.txt``/``.jsonl`` file, a Hub dataset
    id (``owner/name[:config][@split]``, split ``train`` by default; needs ``datasets``), a list of
    strings, or pre-tokenized ids (a LongTensor ``[n, L]`` or a list of lists of ints).

    Text is tokenized once with the tokenizer's default special tokens (a LLaMA tokenizer adds one
    BOS at the very start; SmolLM2's adds none) and window starts are drawn uniformly in
    ``[0, n_tokens - seqlen]`` with a ``torch.Generator`` seeded by ``seed``, as GPTQ does, so windows
    may overlap. Pre-tokenized rows are cut into non-overlapping windows of ``seqlen`` (a remainder
    shorter than ``seqlen`` is dropped) and the first ``num_samples`` windows, row by row, are used;
    ``seed`` does not matter there. ``$BAQ_HF_QUICK_TEST`` cuts ``num_samples`` and ``seqlen`` (see
    :func:`quick_test_sizes`).
    """
    return calibration_and_heldout(dataset, tokenizer, num_samples, seqlen, seed, 0, seqlen)[0]


def calibration_and_heldout(
    dataset: CalibrationData,
    tokenizer: PreTrainedTokenizerBase | None,
    num_samples: int,
    seqlen: int,
    seed: int,
    n_heldout: int,
    heldout_seqlen: int,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """The calibration windows of :func:`calibration_windows` and up to ``n_heldout`` held-out windows.

    Held-out windows (``[k, heldout_seqlen]``, ``k <= n_heldout``, possibly 0) come from the same data
    but share no token with any calibration window: for text, the first stretches of ``heldout_seqlen``
    tokens, in order, that no calibration window covers; for token ids, the windows after the first
    ``num_samples``. Drawing them does not change the calibration windows.
    """
    _check_sizes(num_samples, seqlen)
    num_samples, seqlen = quick_test_sizes(num_samples, seqlen)  # type: ignore[assignment]
    if _is_token_ids(dataset):
        windows = _windows_from_ids(dataset, num_samples, seqlen)  # type: ignore[arg-type]
        spare = windows[num_samples : num_samples + n_heldout, :heldout_seqlen]
        return windows[:num_samples], spare  # type: ignore[return-value]
    ids = _calibration_ids(dataset, tokenizer)
    n_tokens = ids.numel()
    if n_tokens < seqlen:
        raise ValueError(
            f"calibration text has {n_tokens} tokens, fewer than one window of seqlen={seqlen}: "
            "give more text or lower seqlen"
        )
    generator = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n_tokens - seqlen + 1, (num_samples,), generator=generator)
    offsets = torch.arange(seqlen)
    windows = ids[starts[:, None] + offsets[None, :]]
    return windows, _uncovered_windows(ids, starts, seqlen, n_heldout, heldout_seqlen)  # type: ignore[return-value]


def _calibration_ids(dataset: CalibrationData, tokenizer: PreTrainedTokenizerBase | None) -> torch.Tensor:
    """The calibration text (see :func:`calibration_windows`) tokenized once."""
    if dataset is None:
        text = default_calibration_text()
    elif isinstance(dataset, (str, os.PathLike)):
        text = _text_from_source(dataset, default_split="train")
    elif isinstance(dataset, Sequence) and dataset:
        text = load_text(dataset)
    elif isinstance(dataset, Sequence):
        raise ValueError("The calibration dataset is empty: give text or at least one row of token ids.")
    else:
        raise TypeError(
            "dataset must be None, a path to a .txt/.jsonl file, a list of strings, or token ids "
            f"(LongTensor [n, L] or list of lists of ints); got {type(dataset).__name__}."
        )
    if tokenizer is None:
        raise ValueError("Calibration text needs a tokenizer: pass one, or pass pre-tokenized ids instead.")
    return tokenize_text(tokenizer, text)


def _uncovered_windows(
    ids: torch.Tensor, starts: torch.Tensor, seqlen: int, n_windows: int, window: int
) -> torch.Tensor:
    """Up to ``n_windows`` windows of ``window`` tokens, left to right, outside every calibration window."""
    covered = torch.zeros(ids.numel() + 1, dtype=torch.int32)
    covered.index_add_(0, starts, torch.ones_like(starts, dtype=torch.int32))
    covered.index_add_(0, starts + seqlen, -torch.ones_like(starts, dtype=torch.int32))
    free = covered.cumsum(0)[:-1] == 0
    picked: list[torch.Tensor] = []
    position = 0
    while len(picked) < n_windows and position + window <= ids.numel():
        if bool(free[position : position + window].all()):
            picked.append(ids[position : position + window])
            position += window
        else:
            position += 1 + int(torch.nonzero(~free[position : position + window])[-1])
    return torch.stack(picked) if picked else ids.new_zeros((0, window))


def _windows_from_ids(
    dataset: torch.Tensor | Sequence[Sequence[int]], num_samples: int, seqlen: int
) -> torch.LongTensor:
    """Every non-overlapping window of ``seqlen`` tokens, row by row; at least ``num_samples`` of them."""
    rows = _rows_from_ids(dataset)
    windows: list[torch.Tensor] = []
    for i, row in enumerate(rows):
        if row.numel() < seqlen:
            raise ValueError(
                f"Row {i} of the token ids has {row.numel()} tokens, fewer than seqlen={seqlen}: "
                "give longer rows or lower seqlen."
            )
        n_windows = row.numel() // seqlen
        windows.extend(row[: n_windows * seqlen].view(n_windows, seqlen))
    if len(windows) < num_samples:
        raise ValueError(
            f"The token ids give only {len(windows)} windows of seqlen={seqlen}, fewer than "
            f"num_samples={num_samples}: give more or longer rows, or lower num_samples or seqlen."
        )
    return torch.stack(windows)  # type: ignore[return-value]
