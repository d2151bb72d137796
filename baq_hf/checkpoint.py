"""Reliable persistence: atomic saving of quantized models and resumable quantization.

``save_quantized`` writes a complete model folder next to the target and renames it into place, so an
interrupted save never leaves a folder that loads. While the temporary folder is being written it holds
the marker file :data:`INCOMPLETE_MARKER`; the loader refuses any folder that still has it (a save killed
so hard that it could not clean up after itself).

``ResumeState`` backs ``BaqConfig(resume_dir=...)``: after every quantized block it stores, with
safetensors only, the block's packed BaqLinear tensors and the next block's input hidden states, then a
small JSON file (:data:`STATE_FILE`) with the number of finished blocks and a fingerprint of the run
(settings, model name and structure, calibration windows, plan). A rerun with the same folder and a
matching fingerprint restores the finished blocks and continues where the last run stopped; the result
is bit for bit the one an uninterrupted run gives, since the saved hidden states are exactly the tensors
the next block would have received.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors.torch import load_file
from torch import nn

from .filemode import fix_safetensors_modes, save_file
from .format import read_safetensors_header
from .linear import FIXED_DTYPE_BUFFERS, BaqLinear

if TYPE_CHECKING:
    from .config import BaqConfig

logger = logging.getLogger(__name__)

INCOMPLETE_MARKER = ".baq_incomplete"
STATE_FILE = "baq_resume.json"
STATE_VERSION = 1
# files a run writes into resume_dir (a run killed before its first state file leaves only these);
# ".tmpXXXXXX" is the temporary file safetensors (>= 0.6) writes and renames
_OWN_FILE = re.compile(r"(block|hidden)_\d{5}\.safetensors(\.tmp)?|baq_resume\.json\.tmp|\.tmp\w{6}")
_TEMP_FILE = re.compile(r".*\.tmp|\.tmp\w{6}")
# a save's temporary and set-aside folders: .<name>.incomplete-<host>-<pid>-<id>, .<name>.old-<same>
_SAVE_SIBLING = re.compile(r"\.(?P<name>.+)\.(incomplete|old)-(?P<host>[\w-]*)-(?P<pid>\d+)-[0-9a-f]{8}")


# ----------------------------------------------------------------------------------------------
# small file helpers


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_atomically(tmp: Path, final: Path) -> None:
    _fsync_file(tmp)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    _replace_atomically(tmp, path)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, {"format": "pt"})
    _replace_atomically(tmp, path)


# ----------------------------------------------------------------------------------------------
# 16-bit storage of the tensors that are not quantized


def unquantized_storage_dtype(model_dtype: torch.dtype, keep_float32: bool) -> torch.dtype | None:
    """The dtype to store a model's unquantized float tensors in, or None to store them as they are.

    A 16-bit model keeps its dtype; a wider one (float32) is stored in bfloat16, which has float32's
    exponent range (no value overflows, unlike float16), unless ``keep_float32``.
    """
    if keep_float32 or model_dtype.itemsize <= 2:
        return None
    return torch.bfloat16


def _unquantized_float_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Float tensors of the state dict that are stored as they are: all but the BaqLinear ranges."""
    fixed = {
        f"{name}.{buffer}" if name else buffer
        for name, module in model.named_modules()
        if isinstance(module, BaqLinear)
        for buffer in FIXED_DTYPE_BUFFERS
    }
    return {
        key: t
        for key, t in model.state_dict(keep_vars=True).items()
        if key not in fixed and t.is_floating_point() and t.dtype.itemsize > 2
    }


def round_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Make the in-memory model equal what a save in ``dtype`` stores, so evaluating it is honest.

    BaqLinear biases are cast to ``dtype`` (a BaqLinear holds its tensors as stored); every other
    unquantized float tensor keeps its dtype, for computation, and takes the value ``dtype`` stores.
    """
    for module in model.modules():
        if isinstance(module, BaqLinear) and module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)
    with torch.no_grad():
        for t in _unquantized_float_tensors(model).values():
            t.copy_(t.to(dtype))


def storage_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with the unquantized float tensors cast to ``dtype``.

    Tensors shared between keys (tied embeddings) stay shared, so they are still saved once.
    """
    state = model.state_dict()
    cast: dict[int, torch.Tensor] = {}
    for key in _unquantized_float_tensors(model):
        t = state[key]
        ptr = t.data_ptr()
        if ptr not in cast or ptr == 0:  # 0: meta tensors share no storage
            cast[ptr] = t.to(dtype)
        state[key] = cast[ptr]
    return state


# ----------------------------------------------------------------------------------------------
# atomic save


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _host() -> str:
    return re.sub(r"[^\w]", "_", socket.gethostname())[:40]


def _remove_stale_saves(out: Path) -> None:
    """Clean up after saves to ``out`` killed on this host: delete their temporary folders, put back a
    previous folder set aside just before the kill (else delete it)."""
    for path in sorted(out.parent.iterdir()):
        m = _SAVE_SIBLING.fullmatch(path.name)
        if m and m["name"] == out.name and m["host"] == _host() and not _pid_alive(int(m["pid"])):
            if ".old-" in path.name and not out.exists():  # killed between its two renames: put it back
                logger.info("restoring %s, set aside by a save that was killed", out)
                os.rename(path, out)
            else:
                logger.info("removing %s, left by a save that was killed", path)
                shutil.rmtree(path, ignore_errors=True)


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _filesystem(mount: Path) -> str:
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1] == str(mount):
                    return fields[2]
    except OSError:
        pass
    return "unknown"


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, also as raised by safetensors' and tokenizers' Rust writers (plain messages)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def _estimated_weight_bytes(model: nn.Module, save_kwargs: dict[str, Any]) -> int:
    """Bytes of the tensors ``save_pretrained`` will write: shared tensors once, wide float tensors at
    the quantizer's storage dtype (bfloat16 unless keep_float32). Copies nothing."""
    state = save_kwargs.get("state_dict")
    storage = None
    if state is None:
        state = model.state_dict()
        config = getattr(getattr(model, "config", None), "quantization_config", None)
        keep = (
            config.get("keep_float32") if isinstance(config, dict) else getattr(config, "keep_float32", False)
        )
        dtype = getattr(model, "dtype", None)
        if isinstance(dtype, torch.dtype):
            storage = unquantized_storage_dtype(dtype, bool(keep))
    wide = set(_unquantized_float_tensors(model)) if storage is not None else set()
    sizes: dict[tuple[int, int], int] = {}
    for key, t in state.items():
        itemsize = storage.itemsize if key in wide else t.element_size()
        sizes[(t.data_ptr(), t.numel()) if t.data_ptr() else (id(t), 0)] = t.numel() * itemsize
    return sum(sizes.values())


def _disk_full_error(out: Path, needed: int, free: int) -> OSError:
    mount = _mount_point(out.parent)
    mib = 1 << 20
    return OSError(
        errno.ENOSPC,
        f"No space left on the disk holding {out} (mounted at {mount}, {_filesystem(mount)}): the save "
        f"needs about {needed / mib:.1f} MiB (weights and tokenizer) and {free / mib:.1f} MiB were free when "
        "it started; free up space or save to another folder (no partial folder was left)",
    )


def _check_extra_name(name: str) -> None:
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or len(p.parts) != 1 or name == INCOMPLETE_MARKER:
        raise ValueError(f"extra_files name {name!r} must be a plain file name such as 'README.md'")


def _check_saved_folder(folder: Path) -> None:
    """Every weight file the folder lists exists and has a readable safetensors header."""
    files = sorted(folder.glob("*.safetensors"))
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        listed = sorted(set(index.get("weight_map", {}).values()))
        missing = [f for f in listed if not (folder / f).is_file()]
        if missing:
            raise OSError(f"the save in {folder} is missing shard(s) {missing} listed in {index_path.name}")
    if not files:
        raise OSError(f"the save in {folder} wrote no safetensors weight file")
    for path in files:
        read_safetensors_header(path)


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    extra_files: dict[str, str] | Callable[[Path], dict[str, str]] | None = None,
    **save_kwargs: Any,
) -> Path:
    """Save ``model`` (and ``tokenizer``, and ``extra_files`` name -> text) to ``out_dir`` atomically.

    ``extra_files`` may also be a function of the folder being written, called once the weights are in
    it, so that a model card or report can describe the saved files (their size on disk).

    Everything is written into a temporary sibling folder, checked, synced to disk and then renamed to
    ``out_dir``; an existing ``out_dir`` is replaced only after the new folder is complete. If anything
    fails or is interrupted, ``out_dir`` is left as it was and the temporary folder is removed. Extra
    keyword arguments go to ``model.save_pretrained`` (e.g. ``max_shard_size``). Returns ``out_dir``.
    """
    out = Path(os.path.abspath(out_dir))
    if not callable(extra_files):
        for name in extra_files or {}:
            _check_extra_name(name)
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_saves(out)
    needed = _estimated_weight_bytes(model, save_kwargs) + _tokenizer_bytes(tokenizer)
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise _disk_full_error(out, needed, free)
    tag = f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = parent / f".{out.name}.incomplete-{tag}"
    tmp.mkdir()
    try:
        (tmp / INCOMPLETE_MARKER).write_text(
            "baq_hf.checkpoint.save_quantized did not finish writing this folder; delete it\n",
            encoding="utf-8",
        )
        model.save_pretrained(tmp, **save_kwargs)
        fix_safetensors_modes(tmp)  # 0600 from safetensors >= 0.8, 0644 like the rest of the folder
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        extra = extra_files(tmp) if callable(extra_files) else extra_files or {}
        for name, text in extra.items():
            _check_extra_name(name)
            (tmp / name).write_text(text, encoding="utf-8")
        _check_saved_folder(tmp)
        for path in tmp.iterdir():
            if path.is_file():
                _fsync_file(path)
        (tmp / INCOMPLETE_MARKER).unlink()
        _fsync_dir(tmp)
        if out.exists():
            old = parent / f".{out.name}.old-{tag}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            _fsync_dir(parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
            _fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(exc):
            raise _disk_full_error(out, needed, free) from exc
        raise
    return out


def _tokenizer_bytes(tokenizer: Any) -> int:
    """Size of the tokenizer's files in the folder it was loaded from (0 when unknown)."""
    source = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if tokenizer is None or not source.is_dir():
        return 0
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
             "special_tokens_map.json", "chat_template.jinja")  # fmt: skip
    return sum((source / n).stat().st_size for n in names if (source / n).is_file())


def check_complete_folder(folder: str | os.PathLike) -> None:
    """Raise if ``folder`` is a save that never finished (it still holds :data:`INCOMPLETE_MARKER`)."""
    if (Path(folder) / INCOMPLETE_MARKER).exists():
        raise ValueError(
            f"{folder} is an incomplete save (it still holds {INCOMPLETE_MARKER}): the process writing it "
            "was interrupted; delete the folder and save the model again"
        )


# ----------------------------------------------------------------------------------------------
# resumable quantization


class QuantizationPlan(Protocol):
    """What resuming needs to know of the calibration driver's plan (calibration.QuantizationPlan)."""

    blocks_name: str
    blocks: nn.ModuleList
    layers: list[list[str]]  # per block: names (relative to the block) of the layers to quantize


def _sha256_tensor(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint_parts(
    model: nn.Module, plan: QuantizationPlan, windows: torch.Tensor, config: BaqConfig
) -> dict[str, Any]:
    """What a resumed run must share with the run that saved the state."""
    settings = config.to_dict()
    for key in ("resume_dir", "dataset", "tokenizer"):
        settings.pop(key, None)
    structure = hashlib.sha256()
    for name, t in model.state_dict().items():
        structure.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
    parts = {
        "version": STATE_VERSION,
        "config": settings,
        "model_name": str(getattr(model, "name_or_path", "") or ""),
        "model_class": type(model).__name__,
        "model_structure": structure.hexdigest(),
        "calibration_windows": _sha256_tensor(windows.long()),
        "plan": {"blocks": plan.blocks_name, "layers": plan.layers},
    }
    return json.loads(json.dumps(parts))  # as it reads back from the JSON file (tuples become lists)


def _remove_temp_files(folder: Path) -> None:
    """Half-written state files of a killed run (they can be as large as the hidden states)."""
    for p in folder.iterdir():
        if _TEMP_FILE.fullmatch(p.name) and p.is_file():
            p.unlink(missing_ok=True)


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class ResumeState:
    """The saved progress of one quantization run in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path, parts: dict[str, Any], blocks_done: int, layers: dict[str, Any]):
        self.folder = folder
        self.parts = parts
        self.fingerprint = _digest(parts)
        self.blocks_done = blocks_done
        self.layers = layers

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike,
        model: nn.Module,
        plan: QuantizationPlan,
        windows: torch.Tensor,
        config: BaqConfig,
    ) -> ResumeState:
        """Open (or start) the state in ``folder``; raise if it belongs to a different run."""
        path = Path(folder)
        parts = fingerprint_parts(model, plan, windows, config)
        state_path = path / STATE_FILE
        if not state_path.exists():
            present = sorted(p.name for p in path.iterdir()) if path.exists() else []
            foreign = [name for name in present if not _OWN_FILE.fullmatch(name)]
            if foreign:
                raise ValueError(
                    f"BaqConfig.resume_dir={str(folder)!r} holds files that are not a BAQ resume state "
                    f"({', '.join(foreign[:5])}); give an empty or new folder"
                )
            path.mkdir(parents=True, exist_ok=True)
            _remove_temp_files(path)
            return cls(path, parts, 0, {})
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            saved_parts = state["fingerprint_parts"]
            blocks_done = int(state["blocks_done"])
            layers = dict(state["layers"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"BaqConfig.resume_dir={str(folder)!r}: {STATE_FILE} is unreadable ({exc}); "
                "clear the folder or use another resume_dir"
            ) from exc
        if state.get("fingerprint") != _digest(parts) or saved_parts != parts:
            differ = sorted(k for k in set(parts) | set(saved_parts) if parts.get(k) != saved_parts.get(k))
            raise ValueError(
                f"BaqConfig.resume_dir={str(folder)!r} holds the state of a different quantization run "
                f"(it differs in: {', '.join(differ) or 'fingerprint'}); clear the folder or use another "
                "resume_dir"
            )
        if not 0 <= blocks_done <= len(plan.layers):
            raise ValueError(
                f"BaqConfig.resume_dir={str(folder)!r}: {STATE_FILE} claims {blocks_done} finished blocks of "
                f"{len(plan.layers)}; clear the folder or use another resume_dir"
            )
        _remove_temp_files(path)
        logger.info("resuming quantization from %s after %d finished blocks", path, blocks_done)
        return cls(path, parts, blocks_done, layers)

    # -------------------------------------------------------------- files

    def _block_path(self, i: int) -> Path:
        return self.folder / f"block_{i:05d}.safetensors"

    def _hidden_path(self, i: int) -> Path:
        return self.folder / f"hidden_{i:05d}.safetensors"

    def _corrupt(self, what: str) -> ValueError:
        return ValueError(
            f"BaqConfig.resume_dir={str(self.folder)!r} is damaged: {what}; clear the folder or use "
            "another resume_dir"
        )

    # -------------------------------------------------------------- restore / save

    def restore(self, plan: QuantizationPlan, report: dict[str, Any]) -> list[torch.Tensor] | None:
        """Put the finished blocks' BaqLinear layers into the model and return the next block's inputs.

        Returns None when no block is finished (nothing to restore) or all of them are.
        """
        for i in range(self.blocks_done):
            path = self._block_path(i)
            try:
                tensors = load_file(str(path))
            except Exception as exc:
                raise self._corrupt(f"{path.name} cannot be read ({exc})") from exc
            block = plan.blocks[i]
            prefix = f"{plan.blocks_name}.{i}"
            expected_layers = set(plan.layers[i])
            found_layers = {k.rpartition(".")[0] for k in tensors}
            if found_layers != expected_layers:
                raise self._corrupt(
                    f"{path.name} holds layers {sorted(found_layers)}, not {sorted(expected_layers)}"
                )
            for name in plan.layers[i]:
                full = f"{prefix}.{name}"
                own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.rpartition(".")[0] == name}
                try:
                    layer = BaqLinear.from_tensors(own, full)
                except (ValueError, RuntimeError) as exc:
                    raise self._corrupt(f"{path.name}: {exc}") from exc
                block.set_submodule(name, layer.to(block.get_submodule(name).weight.device))
                if full not in self.layers:
                    raise self._corrupt(f"{STATE_FILE} has no report for {full}")
                report["layers"][full] = self.layers[full]
        if self.blocks_done == 0 or self.blocks_done == len(plan.layers):
            return None
        path = self._hidden_path(self.blocks_done)
        try:
            saved = load_file(str(path))
        except Exception as exc:
            raise self._corrupt(f"{path.name} cannot be read ({exc})") from exc
        n = len(saved)
        if sorted(saved) != sorted(f"h.{s}" for s in range(n)):
            raise self._corrupt(f"{path.name} does not hold the hidden states h.0 .. h.{n - 1}")
        return [saved[f"h.{s}"] for s in range(n)]

    def save_block(
        self, i: int, plan: QuantizationPlan, hiddens: list[torch.Tensor], report: dict[str, Any]
    ) -> None:
        """Record that block ``i`` is finished: its packed layers, the next inputs, then the JSON state."""
        block = plan.blocks[i]
        prefix = f"{plan.blocks_name}.{i}"
        tensors: dict[str, torch.Tensor] = {}
        for name in plan.layers[i]:
            for key, t in block.get_submodule(name).state_dict().items():
                tensors[f"{name}.{key}"] = t
            self.layers[f"{prefix}.{name}"] = report["layers"][f"{prefix}.{name}"]
        _write_safetensors(self._block_path(i), tensors)
        last = i + 1 == len(plan.layers)
        if not last:
            _write_safetensors(self._hidden_path(i + 1), {f"h.{s}": h for s, h in enumerate(hiddens)})
        self.blocks_done = i + 1
        _write_json(
            self.folder / STATE_FILE,
            {
                "fingerprint": self.fingerprint,
                "fingerprint_parts": self.parts,
                "blocks_done": self.blocks_done,
                "num_blocks": len(plan.layers),
                "complete": last,
                "layers": self.layers,
            },
        )
        self._hidden_path(i).unlink(missing_ok=True)  # the inputs of the block just finished
