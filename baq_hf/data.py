"""Text loading, named evaluation sets and GPTQ-style calibration windows.

Calibration follows GPTQ: tokenize the text once and draw ``num_samples`` windows of ``seqlen``
tokens at seeded random starts. The default calibration text ships with the package (a slice of
the C4 calibration documents, see ``baq_hf/data/NOTICE.md``), so quantization works offline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DATA_DIR_ENV = "BAQ_HF_DATA_DIR"

# Named evaluation texts, relative to the data directory (``shared/data`` beside the repository).
EVAL_SETS: dict[str, str] = {
    "wikitext2": "wikitext2/wikitext2_test_gptq_joined.txt",
    "ptb": "ptb/ptb.test.txt",
    "c4": "c4/c4_val_eval_first1100_joined.txt",
}
# C4 documents 1100-1999, disjoint from the C4 evaluation documents 0-1099; for benchmarks.
C4_CALIBRATION = "c4/c4_val_calib_docs1100-1999_joined.txt"
# Shipped with the package: the first ~250 KB (whole documents) of the same C4 calibration docs.
DEFAULT_CALIBRATION_RESOURCE = "c4_calibration_sample.txt"

TextSource = str | os.PathLike | Sequence[str]
CalibrationData = str | os.PathLike | Sequence[str] | torch.Tensor | Sequence[Sequence[int]] | None


def _read_text_file(path: Path) -> str:
    """Read UTF-8 text with universal newlines.

    ``\\r\\n`` becomes ``\\n``: the shared WikiText-2 file has CRLF line ends, while GPTQ's text (and
    the reference perplexities) use plain ``\\n``; reading the raw bytes shifts SmolLM2's perplexity.
    """
    return path.read_text(encoding="utf-8")


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


def _candidate_data_dirs() -> list[Path]:
    """``shared/data`` folders found by walking up from the working directory and this package.

    The repository is checked out with ``shared/`` beside it (``/work/main`` and ``/work/shared``);
    checking ``<ancestor>/shared/data`` for every ancestor covers both ``shared/data`` inside a
    folder and ``../shared/data`` beside it.
    """
    found: list[Path] = []
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for ancestor in (start, *start.parents):
            candidate = ancestor / "shared" / "data"
            if candidate.is_dir() and candidate not in found:
                found.append(candidate)
    return found


def data_dirs() -> list[Path]:
    """Where named data files are looked up: ``$BAQ_HF_DATA_DIR`` alone if set, else ``shared/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return [Path(env).expanduser()]
    return _candidate_data_dirs()


def _resolve_data_file(relative: str) -> Path:
    """Find ``relative`` in the data directories, or explain where it was looked for."""
    dirs = data_dirs()
    for folder in dirs:
        path = folder / relative
        if path.is_file():
            return path
    looked = ", ".join(str(d) for d in dirs) or "no shared/data folder found above the working directory"
    raise FileNotFoundError(
        f"Data file {relative!r} not found (looked in: {looked}). Set {DATA_DIR_ENV} to the folder that "
        f"holds wikitext2/, ptb/ and c4/ (the repository's shared/data)."
    )


def eval_text_path(name: str) -> Path:
    """Path of a named evaluation set (one of ``EVAL_SETS``)."""
    if name not in EVAL_SETS:
        raise KeyError(f"Unknown evaluation set {name!r}; known: {', '.join(EVAL_SETS)}.")
    return _resolve_data_file(EVAL_SETS[name])


def resolve_eval_text(name_or_path: str | os.PathLike) -> str:
    """Return the text of a named evaluation set (``wikitext2``, ``ptb``, ``c4``) or of a file."""
    key = os.fspath(name_or_path)
    if key in EVAL_SETS:
        try:
            return load_text(eval_text_path(key))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"Evaluation set {key!r}: {err}") from err
    path = Path(key).expanduser()
    if path.is_file():
        return load_text(path)
    raise FileNotFoundError(
        f"{key!r} is neither a known evaluation set ({', '.join(EVAL_SETS)}) nor an existing .txt/.jsonl "
        f"file. Named sets are read from the repository's shared/data, or from ${DATA_DIR_ENV}."
    )


def calibration_text_path() -> Path:
    """Path of the full C4 calibration text (docs 1100-1999) in the data directory, for benchmarks."""
    return _resolve_data_file(C4_CALIBRATION)


def default_calibration_text() -> str:
    """The calibration text shipped with the package (C4 validation docs 1100 onwards, ~250 KB)."""
    resource = resources.files("baq_hf").joinpath("data", DEFAULT_CALIBRATION_RESOURCE)
    return resource.read_text(encoding="utf-8")


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Tokenize a whole text once into a 1-D LongTensor, as GPTQ does.

    The tokenizer's default special tokens are kept and nothing is truncated.
    """
    # verbose=False silences the "longer than the model's maximum length" warning: we cut windows.
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


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

    ``dataset``: ``None`` (the shipped C4 sample), a path to a ``.txt``/``.jsonl`` file, a list of
    strings, or pre-tokenized ids (a LongTensor ``[n, L]`` or a list of lists of ints).

    Text is tokenized once with the tokenizer's default special tokens (a LLaMA tokenizer adds one
    BOS at the very start; SmolLM2's adds none) and window starts are drawn uniformly in
    ``[0, n_tokens - seqlen]`` with a ``torch.Generator`` seeded by ``seed``, as GPTQ does, so windows
    may overlap. Pre-tokenized rows are cut into non-overlapping windows of ``seqlen`` (a remainder
    shorter than ``seqlen`` is dropped) and the first ``num_samples`` windows, row by row, are used;
    ``seed`` does not matter there.
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
    elif isinstance(dataset, (str, os.PathLike)) or (isinstance(dataset, Sequence) and dataset):
        text = load_text(dataset)  # type: ignore[arg-type]
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
