"""Perplexity under the GPTQ/BAQ protocol.

Tokenize the whole text once, cut non-overlapping windows of ``seqlen`` tokens (the remainder is
dropped), score each window on its own with no cache, and report exp(mean token NLL). This is the
number the GPTQ and BAQ papers report, so results are comparable with their tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import quick_test_sizes, resolve_eval_text, tokenize_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity measurement.

    ``nll`` is the mean token negative log-likelihood (nats) and ``ppl = exp(nll)``; ``n_tokens``
    counts the scored (predicted) tokens, ``n_windows * (seqlen - 1)``.
    """

    ppl: float
    nll: float
    n_windows: int
    n_tokens: int
    seqlen: int


def model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the input embeddings' device (right also for ``device_map`` dispatch)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` with non-overlapping windows of ``seqlen`` tokens.

    The windows are scored by :func:`windows_nll`; ``max_windows`` keeps only the first ones (quick
    checks; ``$BAQ_HF_QUICK_TEST`` cuts both, see :func:`baq_hf.data.quick_test_sizes`).
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2, got {seqlen!r}.")
    if max_windows is not None and (
        isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1
    ):
        raise ValueError(f"max_windows must be None or an integer >= 1, got {max_windows!r}.")
    if not isinstance(text, str) or not text:
        raise ValueError("perplexity() needs a non-empty text string.")
    max_windows, seqlen = quick_test_sizes(max_windows, seqlen)

    ids = tokenize_text(tokenizer, text)
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(
            f"The text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}: "
            "give a longer text or lower seqlen."
        )
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    mean_nll = windows_nll(model, windows, device=device, progress=progress)
    return PerplexityResult(
        ppl=math.exp(mean_nll),
        nll=mean_nll,
        n_windows=n_windows,
        n_tokens=n_windows * (seqlen - 1),
        seqlen=seqlen,
    )


def windows_nll(
    model: PreTrainedModel,
    windows: torch.Tensor,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str | None = None,
) -> float:
    """Mean token NLL (nats) of ``model`` over token windows ``[n, seqlen]``, each scored on its own.

    Each window runs alone with ``use_cache=False`` under ``torch.inference_mode``; the token NLL is
    the cross entropy of ``logits[:-1]`` against ``ids[1:]`` in float32, summed in float64 over all
    windows. The model is put in eval mode for the measurement and its training flag restored afterwards.
    """
    n_windows, seqlen = windows.shape
    target_device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        with torch.inference_mode():
            for index in tqdm(range(n_windows), desc=desc or f"ppl seqlen={seqlen}", disable=not progress):
                window = windows[index : index + 1].to(target_device)
                logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
                if not torch.isfinite(logits).all():
                    raise FloatingPointError(
                        f"Window {index} (tokens {index * seqlen}-{(index + 1) * seqlen - 1}) produced "
                        "NaN or inf logits; the model (or its quantized weights) is numerically broken."
                    )
                nll = F.cross_entropy(logits, window[0, 1:].to(logits.device), reduction="sum")
                total += nll.double().cpu()
    finally:
        model.train(was_training)
    return total.item() / (n_windows * (seqlen - 1))


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    datasets: Sequence[str],
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, PerplexityResult]:
    """Perplexity on each named set (``wikitext2``, ``ptb``, ``c4``) or text file, keyed as given."""
    if isinstance(datasets, str):
        datasets = [datasets]
    results: dict[str, PerplexityResult] = {}
    for name in datasets:
        text = resolve_eval_text(name)
        results[name] = perplexity(
            model, tokenizer, text, seqlen=seqlen, max_windows=max_windows, device=device, progress=progress
        )
    return results
