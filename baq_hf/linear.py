"""BaqLinear: a Linear layer whose weight is stored in the BAQ mixed-bitwidth format (see format.py)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import format as fmt
from .kernels.layout import KernelLayout, stored_qweight

FORCE_TORCH_ENV = "BAQ_HF_FORCE_TORCH"
# Buffers that define the format's exact quantization grid (stored as float16): they follow device moves
# but never dtype casts.
FIXED_DTYPE_BUFFERS = ("range_min", "range_max")


class BaqLinear(nn.Module):
    """y = x W^T + b with W dequantized from packed per-column-bitwidth codes.

    All quantized data are buffers, so ``state_dict``/safetensors carry them and nothing is pickled.
    Derived, non-persistent views (per-column bitwidths, segments) are rebuilt by :meth:`post_init`, and
    again on first use after ``load_state_dict``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        n_words: int = 0,
        group_size: int = -1,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if group_size != -1 and (group_size <= 0 or in_features % group_size):
            raise ValueError(
                f"group_size={group_size} must be -1 or divide in_features={in_features}; "
                "choose a divisor such as 32, 64 or 128"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        n_groups = 1 if group_size == -1 else in_features // group_size
        kw = {"device": device}
        # The packed codes are stored under the name "weight" on purpose: loading a BAQ checkpoint
        # without `import baq_hf` then fails loudly on a shape mismatch instead of silently
        # initializing random Linear weights (transformers skips unknown quantization methods).
        self.register_buffer("weight", torch.zeros(n_words, dtype=torch.int32, **kw))
        self.register_buffer("bits_header", torch.zeros((in_features + 1) // 2, dtype=torch.uint8, **kw))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device))
        self.register_buffer("range_min", torch.zeros(out_features, n_groups, dtype=torch.float16, **kw))
        self.register_buffer("range_max", torch.ones(out_features, n_groups, dtype=torch.float16, **kw))
        if group_size != -1:
            self.register_buffer("group_index", torch.zeros(in_features, dtype=torch.int32, **kw))
        else:
            self.group_index = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._stored_bits: torch.Tensor | None = None
        self._segments: list[fmt.Segment] | None = None
        self._kernel_layout = None  # baq_hf.kernels' layout of the stored tensors (set_kernel_layout)
        self._codes_in_layout = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_layout(
        cls,
        layout: fmt.PackedLayout,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> BaqLinear:
        """An empty layer with exactly the tensors ``layout`` describes (e.g. on the meta device)."""
        return cls(
            layout.in_features,
            layout.out_features,
            bias=layout.has_bias,
            n_words=layout.n_words,
            group_size=layout.group_size,
            dtype=bias_dtype,
            device=device,
        )

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str = "") -> BaqLinear:
        """A layer holding ``tensors`` (stored names, untrusted: checked by :meth:`validate`).

        The bias keeps its dtype; the layer lives on the tensors' device.
        """
        shapes = {key: tuple(t.shape) for key, t in tensors.items()}
        layout = fmt.PackedLayout.from_shapes(shapes, name)
        bias = tensors.get("bias")
        bias_dtype = bias.dtype if bias is not None and bias.is_floating_point() else torch.float32
        layer = cls.from_layout(layout, bias_dtype, device="meta")
        layer.load_state_dict(tensors, strict=True, assign=True)
        layer.validate(name)
        return layer

    @classmethod
    def from_packed(cls, packed: fmt.PackedWeight, bias: torch.Tensor | None = None) -> BaqLinear:
        """A layer from freshly packed tensors and the layer's bias (kept in its dtype), on the CPU."""
        tensors = packed.tensors()
        if bias is not None:
            tensors["bias"] = bias.detach().cpu()
        return cls.from_tensors({key: t.cpu() for key, t in tensors.items()})

    def post_init(self) -> None:
        """Rebuild the derived per-column bitwidths and segments from the loaded header (and drop the
        kernel layout, which may no longer match it)."""
        self.drop_kernel_layout()
        self._derive_from_header()

    def _derive_from_header(self) -> None:
        self._stored_bits = fmt.unpack_header(self.bits_header.cpu(), self.in_features)
        self._segments = fmt.segments_from_bits(self._stored_bits, self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.drop_kernel_layout()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # a new bits_header makes the derived bitwidths and segments stale: rebuild them on next use
        self._stored_bits = None
        self._segments = None

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._codes_in_layout:  # the stored words, rebuilt exactly from the kernel layout
            destination[prefix + "weight"] = self.qweight

    def _apply(self, fn, recurse=True):
        """nn.Module._apply, except that the range buffers keep their dtype (float16 in the format).

        ``model.to(torch.bfloat16)``, ``.half()`` or ``.float()`` would otherwise round them and change
        every dequantized weight; device moves still apply to them, and the bias follows the cast.
        """
        self.drop_kernel_layout()  # built again on the new device
        before = {name: self._buffers[name] for name in FIXED_DTYPE_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes (int32 words), stored in the checkpoint as ``<layer>.weight``."""
        if self._codes_in_layout:
            return stored_qweight(self._kernel_layout)
        return self.weight

    @property
    def layout(self) -> fmt.PackedLayout:
        """What this layer stores, as the format describes it."""
        return fmt.PackedLayout(
            self.out_features, self.in_features, self.weight.numel(), self.group_size, self.bias is not None
        )
    # ------------------------------------------------------------------ kernel layout (GPU kernels)

    def set_kernel_layout(self, layout: KernelLayout, hold_codes: bool) -> None:
        """Keep the kernel layout that :mod:`baq_hf.kernels` built from this layer's stored tensors.

        With ``hold_codes`` the layout holds the codes from now on: its ``codes`` become the
        non-persistent buffer ``kernel_codes`` (so memory accounting sees them) and ``weight`` is emptied,
        so the GPU keeps one copy; ``qweight``, ``state_dict`` and device moves rebuild the stored words
        from the layout, bit for bit.
        """
        self._kernel_layout = layout
        if hold_codes and not self._codes_in_layout:
            self.register_buffer("kernel_codes", layout.codes, persistent=False)
            self._buffers["weight"] = self.weight.new_empty(0)
            self._codes_in_layout = True

    def drop_kernel_layout(self) -> None:
        """Forget the kernel layout (stale after any change); the codes go back to ``weight`` first."""
        if self._codes_in_layout:
            self._buffers["weight"] = stored_qweight(self._kernel_layout)
            del self.kernel_codes
            self._codes_in_layout = False
        self._kernel_layout = None

    def validate(self, name: str = "") -> None:
        """Check loaded tensors against each other before anything runs (checkpoints are untrusted)."""
        self.layout.validate(self.state_dict(), name)
        self.post_init()

    @property
    def stored_bits(self) -> torch.Tensor:
        if self._stored_bits is None:
            self._derive_from_header()
        return self._stored_bits

    @property
    def segments(self) -> list[fmt.Segment]:
        if self._segments is None:
            self._derive_from_header()
        return self._segments

    def column_bits(self) -> torch.Tensor:
        """Bitwidth of every input column, in the original column order."""
        bits = torch.empty_like(self.stored_bits)
        bits[self.perm.long().cpu()] = self.stored_bits
        return bits

    # ------------------------------------------------------------------ size accounting

    @property
    def code_bits(self) -> float:
        """Mean code bits per weight (the paper's "Avg. Bits")."""
        return float(self.stored_bits.float().mean())

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @property
    def effective_bits(self) -> float:
        """8 x bytes of every stored tensor (codes, header, ranges, index, bias) / weights."""
        return 8.0 * self.storage_bytes() / (self.in_features * self.out_features)

    # ------------------------------------------------------------------ compute

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out x in), exactly as GPTQ produced it (computed in fp32)."""
        w = fmt.dequantize_weight(
            self.qweight,
            self.stored_bits.to(self.qweight.device),
            self.perm,
            self.range_min,
            self.range_max,
            self.group_index,
            self.out_features,
        )
        return w if dtype is None else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not os.environ.get(FORCE_TORCH_ENV):
            from .kernels import baq_linear_forward

            return baq_linear_forward(x, self)
        return F.linear(
            x, self.dequantize(x.dtype), self.bias if self.bias is None else self.bias.to(x.dtype)
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, "
            f"code_bits={self.code_bits:.3f}, effective_bits={self.effective_bits:.3f}"
        )
