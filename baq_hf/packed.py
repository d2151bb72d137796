"""PackedCodes: what ``BaqLinear.weight`` returns, the packed int32 words that no code may use as numbers.

BaqLinear is an ``nn.Linear`` so that libraries dispatching on the type (peft's default LoRA layer,
anything that lists a model's Linear layers) take it without a registration call. Such code also
reads and writes ``layer.weight`` as a float matrix: peft's merge adds ``delta.to(weight.dtype)`` to
it, DoRA takes its norm, PiSSA its SVD. On the raw int32 words that would silently corrupt the codes
or compute garbage, so ``weight`` is this view of them: metadata (shape, dtype, device, data_ptr,
...), ``.data``, ``.detach()`` and device moves work, every other torch function or method raises a
PackedCodesError that says what to use instead. The words themselves stay a plain tensor in the
layer's buffers, so state_dict, safetensors, device moves and accelerate see what they saw before.
"""

from __future__ import annotations

from typing import Any

import torch

# Tensor methods that only read metadata (or the raw memory, as serializers do): allowed, plain results.
_READS = frozenset(
    {
        "size", "dim", "ndimension", "numel", "nelement", "element_size", "stride", "storage_offset",
        "data_ptr", "untyped_storage", "is_contiguous", "is_floating_point", "is_complex", "is_signed",
        "get_device", "__len__", "__repr__", "__format__", "__hash__", "__reduce_ex__", "__bool__",
    }
)  # fmt: skip
# Views that keep the words as they are: the result is PackedCodes again.
_VIEWS = frozenset({"detach", "requires_grad_"})
# Device moves (accelerate moves ``getattr(module, name)``): allowed while the dtype stays, plain result.
_MOVES = frozenset({"to", "cpu", "cuda"})

REFUSAL = (
    "BaqLinear.weight holds the packed BAQ codes (int32 words), not a float matrix, so {what} on it is "
    "refused (it would read or change the codes as numbers). Use layer.dequantize(dtype) for the float "
    "weight and layer.qweight for the stored words. To merge a LoRA adapter, dequantize the model first "
    "(`peft_model.base_model.model.dequantize()`, a float model that is no longer quantized), then "
    "call merge_and_unload(); see docs/fine-tuning.md."
)


class PackedCodesError(RuntimeError):
    """Arithmetic on packed codes (a RuntimeError: torch turns a TypeError of ``+=`` into NotImplemented,
    and Python would then try other ways)."""


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


class PackedCodes(torch.Tensor):
    """A view of a BaqLinear's stored int32 words that refuses arithmetic (see the module doc)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name == "__get__":  # an attribute read: dtype, device, shape, data, grad, ...
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            attribute = getattr(getattr(func, "__self__", None), "__name__", "")
            return out.as_subclass(cls) if attribute == "data" else out
        if name in _READS or name in _VIEWS:  # (integer tensors cannot require a gradient: torch says so)
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return out.as_subclass(cls) if name in _VIEWS else out
        if name in _MOVES:
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            if out.dtype == args[0].dtype:
                return plain(out)  # (a move to the same device returns the view itself)
            name = f"{name}({out.dtype})"
        raise PackedCodesError(REFUSAL.format(what=f"`{name}`"))

    def __deepcopy__(self, memo: dict) -> PackedCodes:
        with torch._C.DisableTorchFunctionSubclass():
            return packed_view(self.clone())


def plain(words: torch.Tensor) -> torch.Tensor:
    """The words as a plain tensor (no copy), whether or not they are seen as PackedCodes."""
    if isinstance(words, PackedCodes):
        with torch._C.DisableTorchFunctionSubclass():
            return words.as_subclass(torch.Tensor)
    return words


def packed_view(words: torch.Tensor) -> PackedCodes:
    """``words`` (the stored int32 tensor) seen as PackedCodes; no copy."""
    if isinstance(words, PackedCodes):
        return words
    return words.as_subclass(PackedCodes)
