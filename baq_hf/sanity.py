"""The sanity figure of every quantization: perplexity before and after on held-out calibration text.

A few short windows of the calibration data that no calibration window touches (so neither an
evaluation set nor text the solver has fitted) are scored by the float model before and by the
quantized model after. It costs a few forward passes and shows at once when a run broke the model:
exllamav2 prints such a line after converting and treats perplexities in the thousands as failed;
here the ratio after/before is judged, since what counts as high depends on the model.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from .eval import windows_nll

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

SANITY_WINDOWS = 4
SANITY_SEQLEN = 512  # at most; never longer than the calibration windows
# Measured on SmolLM2-135M (WikiText-2): 3 bits per row 3.8x (BAQ) and 8.1x (uniform GPTQ), 2 bits with
# groups of 64 600x; above this ratio the model is most likely unusable.
FAILED_RATIO = 10.0


def heldout_nll(model: nn.Module, windows: torch.Tensor, which: str = "") -> float | None:
    """Mean token NLL of ``model`` over the held-out windows; None without windows or with NaN/inf logits.

    Shows a progress bar named after ``which`` model: on a CPU the quantized model's passes take minutes.
    """
    if windows.shape[0] == 0:
        return None
    try:
        return windows_nll(model, windows, progress=True, desc=f"sanity check, {which or 'model'}")
    except FloatingPointError:
        return None


def sanity_report(nll_before: float | None, nll_after: float | None, windows: torch.Tensor) -> dict[str, Any]:
    """The report entry (strict JSON: no inf or NaN), logged, and warned about loudly when it looks failed."""
    n, length = windows.shape
    entry: dict[str, Any] = {"source": "held-out calibration text", "windows": n, "seqlen": length}
    if n == 0:
        entry["skipped"] = (
            f"every stretch of {length} tokens of the calibration data overlaps a calibration window; "
            "give more calibration text (or fewer/shorter windows) to get this check"
        )
        logger.info("sanity check skipped: %s", entry["skipped"])
        return entry
    entry["ppl_before"] = _ppl(nll_before)
    entry["ppl_after"] = _ppl(nll_after)
    if entry["ppl_before"] is not None and entry["ppl_after"] is not None:
        entry["ratio"] = entry["ppl_after"] / entry["ppl_before"]
    entry["failed"] = entry["ppl_after"] is None or entry.get("ratio", 0.0) > FAILED_RATIO
    if entry["failed"]:
        logger.warning(
            "QUANTIZATION LOOKS FAILED: %s. Above x%g the model is most likely unusable; try more bits, a "
            "group_size, act_order, or more calibration data.",
            format_sanity(entry),
            FAILED_RATIO,
        )
    else:
        logger.info(format_sanity(entry))
    return entry


def format_sanity(entry: dict[str, Any]) -> str:
    """One line for logs and the CLI."""
    where = f"{entry['windows']} held-out calibration windows of {entry['seqlen']} tokens"
    if "skipped" in entry:
        return f"sanity check not measured: {entry['skipped']}"
    before, after = entry.get("ppl_before"), entry.get("ppl_after")
    text = f"sanity check: perplexity {_fmt(before)} before, {_fmt(after)} after quantization"
    ratio = f" (x{entry['ratio']:.2f})" if "ratio" in entry else ""
    return f"{text}{ratio} on {where}"


def _ppl(nll: float | None) -> float | None:
    if nll is None or not math.isfinite(nll) or nll > 700:  # exp overflows a float beyond ~709
        return None
    return math.exp(nll)


def _fmt(ppl: float | None) -> str:
    return "not finite" if ppl is None else f"{ppl:.2f}"
