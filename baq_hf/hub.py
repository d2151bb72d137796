"""Share a BAQ-quantized model: a generated model card and ``push_to_hub``.

A quantized model on the Hub is only useful if a reader can tell what it is: which base model, how
many bits (code bits and the honest effective bits), how the bits were spread over the layers, and
what quality it keeps. :func:`model_card` writes that as a README.md whose YAML header carries the
machine-readable part (base model, library, ``quantization: baq``, bits, histogram, perplexities).
:func:`push_to_hub` saves model + tokenizer + card + ``baq_report.json`` to a temporary folder and
uploads it in one commit with :meth:`huggingface_hub.HfApi.upload_folder`.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .report import REPORT_FILE, SizeOnDisk, histogram_text, ratio_text, size_on_disk, to_json

if TYPE_CHECKING:
    from torch import nn

DEFAULT_COMMIT_MESSAGE = "Upload BAQ-quantized model (baq_hf)"
# config fields shown in the card, in this order (the rest of quantization_config is in config.json)
_CARD_FIELDS = (
    "bits",
    "allocation",
    "min_bits",
    "max_bits",
    "group_size",
    "sym",
    "act_order",
    "damp_percent",
    "num_samples",
    "seqlen",
    "seed",
    "true_sequential",
)


def _baq_layers(model: nn.Module) -> list[tuple[str, Any]]:
    from .linear import BaqLinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaqLinear)]


def _ppl_value(entry: Any) -> float | None:
    """A perplexity from a number, a PerplexityResult, or a dict with a "ppl" key."""
    if entry is None or isinstance(entry, bool):
        return None
    if isinstance(entry, (int, float)):
        return float(entry)
    if isinstance(entry, dict):
        return _ppl_value(entry.get("ppl"))
    value = getattr(entry, "ppl", None)
    return float(value) if isinstance(value, (int, float)) else None


def _window_info(entry: Any) -> dict[str, int]:
    """``seqlen`` and ``windows`` of a PerplexityResult or result dict, when it carries them."""
    get = entry.get if isinstance(entry, dict) else lambda key: getattr(entry, key, None)
    info = {"seqlen": get("seqlen"), "windows": get("n_windows")}
    return {k: v for k, v in info.items() if isinstance(v, int) and not isinstance(v, bool)}


def normalize_perplexities(perplexities: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``{dataset: {"fp": ppl|None, "baq": ppl|None[, "seqlen": n, "windows": n]}}`` from what users pass.

    Accepted per dataset: a number or a PerplexityResult (the quantized model's perplexity), or a dict
    ``{"fp": ..., "baq": ...}`` whose values are numbers, PerplexityResults or result dicts. Window length
    and count are kept when the results carry them, since a perplexity means little without them.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, entry in (perplexities or {}).items():
        if isinstance(entry, dict) and ("fp" in entry or "baq" in entry):
            fp, baq = entry.get("fp"), entry.get("baq")
            out[str(name)] = {
                "fp": _ppl_value(fp),
                "baq": _ppl_value(baq),
                **_window_info(fp),
                **_window_info(baq),
            }
        else:
            value = _ppl_value(entry)
            if value is None:
                raise ValueError(
                    f"perplexities[{name!r}]={entry!r} is not a perplexity; give a number, a "
                    'PerplexityResult or {"fp": ..., "baq": ...}'
                )
            out[str(name)] = {"fp": None, "baq": value, **_window_info(entry)}
    return out


def model_bits(model: nn.Module) -> tuple[float, float, list[int]]:
    """(mean code bits, effective bits, weights per bitwidth) over every BaqLinear of the model."""
    layers = _baq_layers(model)
    if not layers:
        raise ValueError("the model has no BaqLinear layer: quantize it with BaqConfig first")
    n_total = code = nbytes = 0.0
    hist: list[int] = []
    for _, layer in layers:
        n = layer.in_features * layer.out_features
        n_total += n
        code += layer.code_bits * n
        nbytes += layer.storage_bytes()
        counts = layer.column_bits().bincount().tolist()
        hist += [0] * (len(counts) - len(hist))
        for b, c in enumerate(counts):
            hist[b] += c * layer.out_features
    return code / n_total, 8.0 * nbytes / n_total, hist


def _quantization_config(model: nn.Module) -> dict[str, Any]:
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        return {}
    return qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)


def _display_name(name: str) -> str:
    """A dataset name as shown publicly: a named set as is, a local file by its file name only."""
    return Path(name).name if ("/" in name or "\\" in name) else name


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def model_card(
    model: nn.Module,
    base_model: str | None,
    perplexities: dict[str, Any] | None,
    *,
    repo_id: str | None = None,
    report: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
    size: SizeOnDisk | None = None,
) -> str:
    """README.md text for a BAQ-quantized model: YAML metadata, usage, settings, size, quality and bits.

    ``base_model`` is the Hub id of the float model (None when unknown, e.g. a local folder);
    ``perplexities`` see :func:`normalize_perplexities`; ``repo_id`` is used in the usage snippet;
    ``report`` defaults to ``model.baq_report`` (present right after quantization) and adds Ratio_C
    and Ratio_L per layer; ``notes`` are caveats shown in their own section; ``size`` (of the saved
    folder, :func:`baq_hf.report.size_on_disk`) adds the size on disk next to the 16-bit original.
    """
    from huggingface_hub import ModelCardData

    code_bits, effective_bits, hist = model_bits(model)
    total = sum(hist)
    qconfig = _quantization_config(model)
    ppl = normalize_perplexities(perplexities)
    report = report if report is not None else getattr(model, "baq_report", None)
    stats = (report or {}).get("layers", {})

    tags = ["baq", "quantized", "gptq", "mixed-precision"]
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
        "quantization": "baq",
        "bits": qconfig.get("bits"),
        "code_bits": round(code_bits, 4),
        "effective_bits": round(effective_bits, 4),
        "allocation": qconfig.get("allocation"),
        "group_size": qconfig.get("group_size"),
        "bit_histogram": {str(b): round(n / total, 6) for b, n in enumerate(hist) if n},
    }
    if base_model:
        meta["base_model"] = base_model
        meta["base_model_relation"] = "quantized"
    if qconfig.get("dataset") is None:
        meta["datasets"] = ["allenai/c4"]  # the calibration sample shipped with baq_hf
    if size is not None:
        meta["size_bytes"] = size.safetensors_bytes
        meta["original_16bit_bytes"] = size.original_16bit_bytes
    if ppl:
        meta["perplexity"] = {
            _display_name(name): {k: round(v, 4) for k, v in e.items() if v is not None}
            for name, e in ppl.items()
        }
    yaml = ModelCardData(**meta).to_yaml()

    where = repo_id or "path/to/this/model"
    title = (
        f"{base_model.rpartition('/')[2]} BAQ {_fmt(code_bits, 2)}-bit"
        if base_model
        else "BAQ-quantized model"
    )
    base_text = (
        f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a causal language model"
    )
    lines = [
        "---",
        yaml.rstrip("\n"),
        "---",
        "",
        f"# {title}",
        "",
        f"This is {base_text} quantized with **BAQ** (GPTQ with a per-column bit allocation that minimises "
        f"the layer's output error) by `baq_hf`: **{code_bits:.3f} code bits** per weight "
        f"on average, **{effective_bits:.3f} effective bits** counting every stored tensor (codes, bitwidth "
        "header, column permutation, fp16 ranges, bias). Embeddings, norms and `lm_head` are not quantized.",
        "",
        "## Usage",
        "",
        "```python",
        'import baq_hf  # registers the "baq" quantization method with transformers',
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
        "```",
        "",
        "`pip install baq_hf` first. Loading without `import baq_hf` fails loudly with a shape mismatch "
        "(the packed codes are stored as `weight`), rather than silently building a random model. "
        "`model.dequantize()` turns the model back into a plain float model.",
        "",
        "## Quantization settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key in _CARD_FIELDS:
        if key in qconfig:
            lines.append(f"| {key} | {qconfig[key]} |")
    calib = qconfig.get("dataset")
    calib = _display_name(calib) if calib else "C4 sample shipped with baq_hf (C4 validation documents 1100+)"
    lines.append(f"| calibration data | {calib} |")
    if report and isinstance(report.get("seconds"), (int, float)):
        lines.append(f"| calibration time | {report['seconds']:.0f} s |")

    if size is not None:
        dtypes = ", ".join(size.unquantized_dtypes) or "none"
        lines += [
            "",
            "## Size",
            "",
            f"The weight files take **{size.text()}**; the original counts {size.float_parameters:,} "
            f"parameters at 2 bytes each. The tensors that are not quantized (embeddings, norms, biases) "
            f"are stored as {dtypes}.",
        ]
    if ppl:
        lines += [
            "",
            "## Perplexity",
            "",
            "Measured at quantization time with baq_hf's GPTQ protocol (text tokenized once, "
            "non-overlapping windows, exp of the mean token NLL); lower is better.",
            "",
            "| dataset | float | BAQ | window (tokens) | windows |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {_display_name(name)} | {_fmt(e['fp'], 2)} | {_fmt(e['baq'], 2)} | {e.get('seqlen', '-')} | "
            f"{e.get('windows', '-')} |"
            for name, e in ppl.items()
        ]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]

    lines += ["", "## Bit allocation", "", "Share of the quantized weights stored at each bitwidth:", ""]
    lines += ["| bits | " + " | ".join(str(b) for b, n in enumerate(hist) if n) + " |"]
    lines += ["|---|" + "---:|" * sum(1 for n in hist if n)]
    lines += ["| share | " + " | ".join(f"{100 * n / total:.1f}%" for n in hist if n) + " |"]
    lines += [
        "",
        "<details><summary>Per-layer bits</summary>",
        "",
        "Ratio_C = GM(C)/AM(C) is the loss ratio BAQ predicts against uniform bits; Ratio_L is the measured "
        "ratio (only when quantized with `compare_uniform=True`; at a fractional target, against both "
        "integer neighbours). Histogram: `bits:columns`.",
        "",
        "| layer | shape | code bits | effective bits | Ratio_C | Ratio_L | histogram |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, layer in _baq_layers(model):
        s = stats.get(name, {})
        hist_cols = layer.column_bits().bincount().tolist()
        lines.append(
            f"| {name} | {layer.out_features}x{layer.in_features} | {layer.code_bits:.3f} | "
            f"{layer.effective_bits:.3f} | {_fmt(s.get('ratio_c'))} | "
            f"{ratio_text(s.get('ratio_l'), s.get('ratio_l_vs'))} | "
            f"{histogram_text(hist_cols)} |"
        )
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def build_report(
    model: nn.Module,
    perplexities: dict[str, Any] | None = None,
    base_model: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What goes to ``baq_report.json``: settings, the calibration report, eval results, extras."""
    from . import __version__

    out: dict[str, Any] = {
        "baq_hf_version": __version__,
        "base_model": base_model,
        "quantization_config": _quantization_config(model),
        "report": getattr(model, "baq_report", None),
        "eval": normalize_perplexities(perplexities),
    }
    out.update(extra or {})
    return out


def save_folder(
    model: nn.Module,
    folder: str | Path,
    tokenizer: Any = None,
    perplexities: dict[str, Any] | None = None,
    *,
    base_model: str | None = None,
    repo_id: str | None = None,
    extra_report: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write model (safetensors + config.json), tokenizer, baq_report.json and README.md to ``folder``.

    The folder is written atomically (:func:`baq_hf.checkpoint.save_quantized`: a temporary sibling
    renamed into place), so an interrupted save never leaves a folder that half loads; an existing
    ``folder`` is replaced.
    """
    from .checkpoint import save_quantized

    model_bits(model)  # fails now, not after writing the weights, if the model is not quantized

    def describe(saved: Path) -> dict[str, str]:
        """Card and report of the folder being written, so they can state its size on disk."""
        size = size_on_disk(saved)
        card = model_card(model, base_model, perplexities, repo_id=repo_id, notes=notes, size=size)
        extra = {"size": size.to_dict(), **(extra_report or {})}
        report = build_report(model, perplexities, base_model, extra)
        return {REPORT_FILE: to_json(report), "README.md": card}

    return save_quantized(model, folder, tokenizer, extra_files=describe)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    **kwargs: Any,
) -> Any:
    """Create the model repo if needed and upload ``folder`` in one commit; returns the CommitInfo."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        **kwargs,
    )


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    tokenizer: Any = None,
    perplexities: dict[str, Any] | None = None,
    *,
    base_model: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    **kwargs: Any,
) -> Any:
    """Save model, tokenizer, model card and report to a temp folder and upload it to ``repo_id``.

    ``kwargs`` go to :meth:`HfApi.upload_folder` (e.g. ``revision``, ``create_pr``). Returns the
    CommitInfo of the upload.
    """
    with tempfile.TemporaryDirectory(prefix="baq_hf-push-") as tmp:
        folder = save_folder(
            model, Path(tmp) / "model", tokenizer, perplexities, base_model=base_model, repo_id=repo_id
        )
        return push_folder(
            folder, repo_id, private=private, token=token, commit_message=commit_message, **kwargs
        )
