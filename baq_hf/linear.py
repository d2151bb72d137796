"""BaqLinear: a Linear layer whose weight is stored in the BAQ mixed-bitwidth format (see format.py)."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import format as fmt
from . import kernels
from .kernels.cpu import CpuLayout, build_cpu_layout, cpu_linear
from .kernels.layout import LAYOUTS, KernelLayout, build_layout, register_layout, stored_qweight
from .packed import PackedCodes, packed_view, plain

FORCE_TORCH_ENV = "BAQ_HF_FORCE_TORCH"
# Buffers that define the format's exact quantization grid (stored as float16): they follow device moves
# but never dtype casts.
FIXED_DTYPE_BUFFERS = ("range_min", "range_max")
_WEIGHT_NAMES = tuple(n for n in fmt.TENSOR_NAMES if n != fmt.BIAS)  # the packed weight's buffers


class BaqLinear(nn.Linear):
    """y = x W^T + b with W dequantized from packed per-column-bitwidth codes.

    An ``nn.Linear`` (without nn.Linear's float weight) so that code dispatching on the type, such as
    peft's LoRA, takes it as it is; :attr:`weight` is a :class:`~baq_hf.packed.PackedCodes` view of
    the codes that refuses to be used as a float matrix (docs/fine-tuning.md).

    The packed weight's tensors (declared in :data:`baq_hf.format.TENSORS`) are buffers under their
    stored names, so ``state_dict``/safetensors carry them and nothing is pickled; :attr:`baq_weight` is
    the :class:`~baq_hf.format.BaqWeight` over them. The compute layouts built from it (the GPU kernel
    layout) are cached here and dropped whenever the stored tensors may change.
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
        rotated: bool = False,
    ):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        # transformers initializes the nn.Linear it finds not loaded (e.g. offloaded to disk): a BaqLinear
        # holds only what a checkpoint or the quantizer gave it, never an initialization
        self._is_hf_initialized = True
        if group_size != -1 and (group_size <= 0 or in_features % group_size):
            raise ValueError(
                f"group_size={group_size} must be -1 or divide in_features={in_features}; "
                "choose a divisor such as 32, 64 or 128"
            )
        self.in_features = in_features
        self.out_features = out_features
        shape = fmt.WeightShape.of(out_features, in_features, n_words, group_size, bias, rotated)
        self.group_size = shape.group_size  # -1 also for one group as wide as the row
        # The packed codes are stored under the name "weight" on purpose: loading a BAQ checkpoint
        # without `import baq_hf` then fails loudly on a shape mismatch instead of silently
        # initializing random Linear weights (transformers skips unknown quantization methods).
        stored = fmt.BaqWeight.empty(shape, device).tensors
        for name in _WEIGHT_NAMES:
            self.register_buffer(name, stored.get(name))  # None: an optional tensor this layer lacks
        if bias:
            zeros = torch.zeros(out_features, dtype=dtype, device=device)
            self.bias = nn.Parameter(zeros, requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._weight: fmt.BaqWeight | None = None  # the record over the current buffers (baq_weight)
        self._weight_sources: list[torch.Tensor | None] = [None] * len(_WEIGHT_NAMES)
        self._kernel_layout: KernelLayout | None = None
        self._codes_in_layout = False
        self._cpu_layout: CpuLayout | None = None
        # dtype of the CPU product (None: the input's, exact for fp32); see set_cpu_compute_dtype
        self.cpu_compute_dtype: torch.dtype | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_shape(
        cls,
        shape: fmt.WeightShape,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> BaqLinear:
        """An empty layer with exactly the tensors ``shape`` describes (e.g. on the meta device)."""
        return cls(
            shape.in_features,
            shape.out_features,
            bias=shape.has_bias,
            n_words=shape.n_words,
            group_size=shape.group_size,
            dtype=bias_dtype,
            device=device,
            rotated=shape.rotated,
        )

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str = "") -> BaqLinear:
        """A layer holding ``tensors`` (stored names, untrusted: checked by :meth:`validate`).

        The bias keeps its dtype; the layer lives on the tensors' device.
        """
        shape = fmt.WeightShape.from_shapes({key: tuple(t.shape) for key, t in tensors.items()}, name)
        bias = tensors.get(fmt.BIAS)
        bias_dtype = bias.dtype if bias is not None and bias.is_floating_point() else torch.float32
        layer = cls.from_shape(shape, bias_dtype, device="meta")
        layer.load_state_dict(tensors, strict=True, assign=True)
        layer.validate(name)
        return layer

    @classmethod
    def from_packed(cls, packed: fmt.BaqWeight, bias: torch.Tensor | None = None) -> BaqLinear:
        """A layer from a freshly packed weight and the layer's bias (kept in its dtype), on the CPU."""
        tensors = {key: t.cpu() for key, t in packed.tensors.items()}
        if bias is not None:
            tensors[fmt.BIAS] = bias.detach().cpu()
        return cls.from_tensors(tensors)

    def post_init(self) -> None:
        """Forget what was derived from the stored tensors (they were changed in place)."""
        self.drop_kernel_layout()
        self._cpu_layout = None
        self._weight = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.post_init()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # the stored words as a plain tensor (rebuilt exactly from the kernel layout if it holds them)
        destination[prefix + "weight"] = self.qweight

    def _apply(self, fn, recurse=True):
        """nn.Module._apply, except that the range buffers keep their dtype (float16 in the format).

        ``model.to(torch.bfloat16)``, ``.half()`` or ``.float()`` would otherwise round them and change
        every dequantized weight; device moves still apply to them, and the bias follows the cast.
        """
        self.post_init()  # layouts are built again on the new device
        before = {name: self._buffers[name] for name in FIXED_DTYPE_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    # ------------------------------------------------------------------ the packed weight

    @property
    def weight(self) -> PackedCodes:  # type: ignore[override]
        """The stored words (plain in the buffers) seen as :class:`~baq_hf.packed.PackedCodes`."""
        words = self._buffers.get("weight")
        if words is None:
            raise AttributeError("weight")  # not registered yet (register_buffer asks hasattr first)
        view = packed_view(words)
        view._is_hf_initialized = True  # for model inits that reach in (GPT-2's c_proj): skip the codes
        return view

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes (int32 words), stored in the checkpoint as ``<layer>.weight``."""
        if self._codes_in_layout:
            return stored_qweight(self._kernel_layout)
        return plain(self._buffers["weight"])

    def _stored(self) -> dict[str, torch.Tensor]:
        """The weight's buffers by stored name (the codes as stored, even while a layout holds them)."""
        out = {n: b for n in _WEIGHT_NAMES if (b := self._buffers.get(n)) is not None}
        out["weight"] = self.qweight
        return out

    @property
    def baq_weight(self) -> fmt.BaqWeight:
        """The packed weight over this layer's buffers (rebuilt when a buffer was replaced)."""
        sources = [self._buffers.get(n) for n in _WEIGHT_NAMES]
        old = self._weight_sources
        if self._weight is None or any(a is not b for a, b in zip(sources, old, strict=True)):
            self._weight = fmt.BaqWeight(self.out_features, self._stored())
            self._weight_sources = sources
        return self._weight

    @property
    def weight_shape(self) -> fmt.WeightShape:
        """What this layer stores, as the format describes it."""
        shape = self.baq_weight.shape
        if self.bias is None:
            return shape
        return dataclasses.replace(shape, optional=shape.optional | {fmt.BIAS})

    def validate(self, name: str = "") -> None:
        """Check loaded tensors against each other before anything runs (checkpoints are untrusted)."""
        self.post_init()
        fmt.validate(self.weight_shape, self.state_dict(), name)

    @property
    def stored_bits(self) -> torch.Tensor:
        return self.baq_weight.stored_bits

    @property
    def segments(self) -> list[fmt.Segment]:
        return self.baq_weight.segments

    def column_bits(self) -> torch.Tensor:
        """Bitwidth of every input column, in the original column order."""
        return self.baq_weight.column_bits()

    @property
    def code_bits(self) -> float:
        """Mean code bits per weight (the paper's "Avg. Bits")."""
        return self.baq_weight.code_bits

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @property
    def effective_bits(self) -> float:
        """8 x bytes of every stored tensor (codes, header, ranges, index, bias) / weights."""
        return 8.0 * self.storage_bytes() / (self.in_features * self.out_features)

    # ------------------------------------------------------------------ kernel layout (GPU kernels)

    def _offloaded(self) -> bool:
        """True if accelerate moves this layer's tensors in for each forward (CPU or disk offload)."""
        hook = getattr(self, "_hf_hook", None)
        hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
        return any(getattr(h, "offload", False) for h in hooks)

    def kernel_layout(self) -> KernelLayout:
        """The kernel layout of the stored weight, built on the layer's device on first use.

        The layer keeps it, and the layout then holds the codes: they become the non-persistent buffer
        ``kernel_codes`` (so memory accounting sees them) and ``weight`` is emptied, so the GPU keeps one
        copy; ``qweight``, ``state_dict`` and device moves rebuild the stored words bit for bit. Layers
        that accelerate offloads get a layout per call, never kept, so that their weights do not stay on
        the GPU.
        """
        layout = self._kernel_layout
        offloaded = self._offloaded()
        if layout is None or offloaded or layout.device != self.perm.device:
            stored = self.baq_weight
            self.drop_kernel_layout()
            layout = register_layout(build_layout(stored.to(self.perm.device)))
            if not offloaded:
                self._kernel_layout = layout
                self.register_buffer("kernel_codes", layout.codes, persistent=False)
                self._buffers["weight"] = self._buffers["weight"].new_empty(0)
                self._codes_in_layout = True
        elif not torch.compiler.is_compiling() and LAYOUTS.get(layout.op_key) is not layout:
            register_layout(layout)  # a deep copy of a layer carries its layout with the original's key
        return layout

    def drop_kernel_layout(self) -> None:
        """Forget the kernel layout (stale after any change); the codes go back to ``weight`` first."""
        if self._codes_in_layout:
            self._buffers["weight"] = stored_qweight(self._kernel_layout)
            del self.kernel_codes
            self._codes_in_layout = False
        self._kernel_layout = None

    # ------------------------------------------------------------------ CPU layout

    def cpu_layout(self) -> CpuLayout:
        """The CPU compute layout (:mod:`baq_hf.kernels.cpu`), built on first use and kept, except for
        layers that accelerate offloads (their tensors come and go with each call).

        It holds the codes a second time, as int4 columns (about 0.9 byte per weight at 3 bits with
        groups of 64), next to the stored bitstream, which state_dict and the GPU path read.
        """
        if self._cpu_layout is not None and not self._offloaded():
            return self._cpu_layout
        layout = build_cpu_layout(self.baq_weight)
        if not self._offloaded():
            self._cpu_layout = layout
        return layout

    # ------------------------------------------------------------------ compute

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out x in), exactly as GPTQ produced it (computed in fp32); for a rotated
        layer the rotated weight W' that acts on R x (see :meth:`effective_weight`)."""
        return self.baq_weight.dequantize(dtype)

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight that acts on the layer's inputs as they come (W' R when rotated)."""
        return self.baq_weight.effective_weight(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A rotated layer first rotates x (R x, on every path); then CUDA: the Triton kernels; CPU: the
        CPU layout's product; else (or with BAQ_HF_FORCE_TORCH=1) the reference: dequantize, ``F.linear``."""
        rotation = self.baq_weight.rotation
        if rotation is not None:
            x = rotation.apply(x)
        if not os.environ.get(FORCE_TORCH_ENV):
            if x.is_cuda:
                return kernels.linear(x, self.kernel_layout(), self.bias)
            if x.device.type == "cpu":
                return cpu_linear(x, self.cpu_layout(), self.bias, self.cpu_compute_dtype)
        return F.linear(
            x, self.dequantize(x.dtype), self.bias if self.bias is None else self.bias.to(x.dtype)
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, "
            f"code_bits={self.code_bits:.3f}, effective_bits={self.effective_bits:.3f}"
        )


def set_cpu_compute_dtype(model: nn.Module, dtype: torch.dtype | None = torch.bfloat16) -> int:
    """Compute every BaqLinear of ``model`` on the CPU in ``dtype``; returns how many layers.

    Opt-in speed for a model loaded in float32 (a BAQ checkpoint's default): with ``torch.bfloat16``
    the packed layers cast their input to bf16, use torch's int4 kernel and cast back, which
    docs/results/cpu_runtime.md measures faster than the fp32 model, while the unquantized tensors (the
    embedding and ``lm_head``) stay fp32. Results then carry bf16 rounding (about 2^-8 relative per
    layer) instead of fp32's. ``None`` restores the default: the input's dtype, exact to fp32 rounding.
    GPU layers are not affected.
    """
    if dtype not in (None, torch.bfloat16, torch.float32):
        raise ValueError(
            f"CPU compute dtype {dtype} is not supported: use torch.bfloat16, torch.float32 or None"
        )
    layers = [m for m in model.modules() if isinstance(m, BaqLinear)]
    for layer in layers:
        layer.cpu_compute_dtype = dtype
    return len(layers)


def prepare_kernel_layouts(model: nn.Module) -> int:
    """Build the kernel layout of every BaqLinear of ``model`` on a CUDA device; returns how many.

    BaqLinear builds its layout on first use anyway; call this after loading and moving the model and
    before ``torch.compile``, so that the host-side building stays out of compiled graphs (loading a
    BAQ checkpoint with ``from_pretrained`` does it for the layers it places on GPUs).
    """
    layers = [m for m in model.modules() if isinstance(m, BaqLinear) and m.perm.is_cuda]
    for layer in layers:
        layer.kernel_layout()
    return len(layers)
