"""The BaqLinear storage format: quantization grids, dense bit packing and exact dequantization.

One quantized weight W (M out x N in) is stored as:

- ``perm`` (int32, N): stored column k holds original input column ``perm[k]``. Columns are sorted by
  bitwidth (stable), so equal-bitwidth columns are contiguous "segments" (as in EXL2).
- ``bits_header`` (uint8, ceil(N/2)): the 4-bit bitwidth of every stored column, low nibble first.
- ``range_min`` / ``range_max`` (fp16, M x G): the quantization range of each row (G = 1) or of each
  row and group of ``group_size`` columns (G = N / group_size).
- ``group_index`` (int32, N, only when grouped): the range group of every stored column.
- ``qweight`` (int32, n_words): the codes. For each bitwidth R >= 1 present, in increasing order, the
  M x n_R codes of that segment form one dense little-endian bitstream in row-major order (code (i, k)
  at bit ``(i * n_R + k) * R``); each segment starts at a 32-bit word boundary. 0-bit columns store
  nothing and dequantize to 0.

- ``rotation_signs`` (int8, N) and ``rotation_block`` (int32, 1), only for layers quantized with a
  rotation (``BaqConfig.rotation``): the layer computes ``W' (R x)`` with ``R = H S``, S the diagonal of
  the +-1 signs and H the orthonormal Hadamard matrix applied to every block of ``rotation_block``
  consecutive inputs (baq_hf/rotation.py). The codes describe the rotated weight ``W' = W R^T``;
  :meth:`BaqWeight.dequantize` returns W', :meth:`BaqWeight.effective_weight` the weight ``W' R`` that
  acts on un-rotated inputs.

- ``bias`` (M, only when the layer has one): not quantized, in a float dtype of the checkpoint's choice.

:data:`TENSORS` declares these tensors once (names, dtypes, shape rules, which are optional);
:class:`WeightShape` is the sizes they derive from (built from a safetensors header without loading
data) and :class:`BaqWeight` one packed weight: packing, validation of untrusted tensors, the torch
reference dequantization and the size accounting. The loader, the report, the resume code, the model
card, ``BaqLinear`` and the kernel layouts all go through them. Checkpoints record the format version
they were written with (:data:`FORMAT_VERSION`, in the quantization config).

The grid of a row (or group) with range [mn, mx] at R bits is GPTQ's asymmetric grid, derived from the
fp16 range in fp32: ``scale = (mx - mn) / (2^R - 1)``, ``zero = floor(-mn / scale + 1/2)``, and a code q
dequantizes to ``scale * (q - zero)``. The quantizer and every dequantization path (torch, Triton)
evaluate exactly these fp32 operations, so a reloaded checkpoint reproduces GPTQ's weights bit for bit.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .rotation import Rotation, hadamard_factor
from .specs import MAX_BITS as MAX_BITS  # re-exported: the format bounds every bitwidth

# Version of the stored format, saved in every checkpoint's quantization config. 1: checkpoints written
# before the version was recorded (same tensors); 2: the version is recorded. A loader reads every
# version up to its own and refuses newer ones by name.
FORMAT_VERSION = 2

# Codes unpacked per chunk (a multiple of 8), to bound the temporaries of large layers.
_UNPACK_CHUNK = 1 << 22

# A loader recognises a packed layer by this tensor; the other names follow.
HEADER_TENSOR = "bits_header"
# The dtypes a safetensors header names, as torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
}  # fmt: skip


def grid(range_min: torch.Tensor, range_max: torch.Tensor, bits: torch.Tensor | int):
    """Return (scale, zero) in fp32 for the given fp16-representable ranges and bitwidth(s).

    ``bits`` broadcasts against the ranges. For 0 bits scale and zero are 0 (the column is dropped).
    """
    mn = range_min.float()
    mx = range_max.float()
    bits_t = torch.as_tensor(bits, device=mn.device)
    levels = (torch.ones_like(bits_t, dtype=torch.int64) << bits_t.long()) - 1
    levels_f = levels.float().clamp(min=1.0)
    scale = (mx - mn) / levels_f
    zero = torch.floor(-mn / scale + 0.5)
    dropped = bits_t == 0
    scale = torch.where(dropped, torch.zeros_like(scale), scale)
    zero = torch.where(dropped, torch.zeros_like(zero), zero)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's rounding of ``w`` onto the grid: integer codes in [0, 2^bits - 1] (float tensor)."""
    if bits == 0:
        return torch.zeros_like(w)
    maxq = float((1 << bits) - 1)
    return torch.clamp(torch.round(w / scale) + zero, 0.0, maxq)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Exact dequantization ``scale * (q - zero)`` in fp32."""
    return scale * (codes.float() - zero)


def fit_range(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's per-row range of ``w`` (rows x cols), forced to include 0, rounded to fp16.

    Returns fp16 (min, max) with max > min guaranteed, which makes every grid well defined.
    """
    w = w.float()
    mn = torch.clamp(w.min(dim=1).values, max=0.0)
    mx = torch.clamp(w.max(dim=1).values, min=0.0)
    if sym:
        mx = torch.maximum(mn.abs(), mx)
        mn = -mx
    too_large = max(mx.abs().max().item(), mn.abs().max().item()) if w.numel() else 0.0
    if too_large > torch.finfo(torch.float16).max:
        raise ValueError(
            f"weight magnitude {too_large:.3g} exceeds the fp16 range used to store quantization ranges; "
            "rescale the layer or keep it unquantized with modules_to_not_convert"
        )
    mn16, mx16 = mn.half(), mx.half()
    degenerate = mx16 <= mn16
    mn16 = torch.where(degenerate, torch.full_like(mn16, -1.0), mn16)
    mx16 = torch.where(degenerate, torch.full_like(mx16, 1.0), mx16)
    return mn16, mx16


# ----------------------------------------------------------------------------------------------
# headers and segments


def pack_header(bits: torch.Tensor) -> torch.Tensor:
    """Pack per-column bitwidths (0..15) into uint8 nibbles, low nibble first."""
    b = bits.to(torch.uint8).cpu()
    if b.numel() % 2:
        b = torch.cat([b, torch.zeros(1, dtype=torch.uint8)])
    pairs = b.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_header(header: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_header`: int64 bitwidths of the ``n_cols`` stored columns."""
    h = header.to(torch.int64)
    bits = torch.stack([h & 0xF, h >> 4], dim=1).reshape(-1)
    return bits[:n_cols]


@dataclass(frozen=True)
class Segment:
    """A run of stored columns sharing one bitwidth, and where its codes start in ``qweight``."""

    bits: int
    col_start: int
    n_cols: int
    word_start: int

    def n_words(self, n_rows: int) -> int:
        return words_for(n_rows * self.n_cols * self.bits)


def words_for(n_bits: int) -> int:
    return (n_bits + 31) // 32


def segments_from_bits(stored_bits: torch.Tensor, n_rows: int) -> list[Segment]:
    """Segments of a sorted per-column bitwidth vector; raises if the columns are not sorted."""
    bits = stored_bits.tolist()
    if any(b2 < b1 for b1, b2 in itertools.pairwise(bits)):
        raise ValueError("stored column bitwidths must be sorted in increasing order")
    segments: list[Segment] = []
    word = 0
    start = 0
    while start < len(bits):
        b = bits[start]
        end = start
        while end < len(bits) and bits[end] == b:
            end += 1
        seg = Segment(bits=b, col_start=start, n_cols=end - start, word_start=word)
        word += seg.n_words(n_rows)
        segments.append(seg)
        start = end
    return segments


def total_words(segments: list[Segment], n_rows: int) -> int:
    return sum(s.n_words(n_rows) for s in segments)


# ----------------------------------------------------------------------------------------------
# dense bit packing


def _pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat tensor of codes (< 2^bits) into a little-endian bitstream of int32 words."""
    c = codes.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((c.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 32
    if pad:
        stream = torch.cat([stream, torch.zeros(pad, dtype=torch.int64)])
    words = (stream.view(-1, 32) << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    # reinterpret as signed int32 (two's complement) without overflow
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def pack_codes(stored_codes: torch.Tensor, stored_bits: torch.Tensor) -> torch.Tensor:
    """Pack M x N codes (columns already in storage order, bits sorted) into ``qweight``."""
    n_rows = stored_codes.shape[0]
    parts = []
    for seg in segments_from_bits(stored_bits, n_rows):
        if seg.bits == 0:
            continue
        block = stored_codes[:, seg.col_start : seg.col_start + seg.n_cols].cpu()
        if block.numel() and int(block.max()) >= (1 << seg.bits):
            raise ValueError(f"a code does not fit in {seg.bits} bits")
        parts.append(_pack_stream(block, seg.bits))
    if not parts:
        return torch.zeros(0, dtype=torch.int32)
    return torch.cat(parts)


def unpack_segment(
    qweight: torch.Tensor, seg: Segment, n_rows: int, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """Codes (``dtype``, M x n_cols) of one segment, read from the dense bitstream.

    Bit j of the stream is bit ``j % 8`` of byte ``j // 8`` of the words (little-endian int32), so the
    codes are read from the words' bytes as uint8 bits, ``_UNPACK_CHUNK`` codes at a time (a multiple of
    8 codes is a whole number of bytes): no int64 temporaries per code.
    """
    device = qweight.device
    if seg.bits == 0:
        return torch.zeros(n_rows, seg.n_cols, dtype=dtype, device=device)
    words = qweight[seg.word_start : seg.word_start + seg.n_words(n_rows)].contiguous()
    stream = words.view(torch.uint8) if sys.byteorder == "little" else _little_endian_bytes(words)
    n, b = n_rows * seg.n_cols, seg.bits
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    out = torch.empty(n, dtype=dtype, device=device)
    for start in range(0, n, _UNPACK_CHUNK):
        count = min(n, start + _UNPACK_CHUNK) - start
        part = stream[start * b // 8 : (start * b + count * b + 7) // 8]
        bit = ((part.unsqueeze(1) >> shifts) & 1).view(-1)[: count * b].view(count, b)
        codes = out[start : start + count]
        codes.copy_(bit[:, 0])
        for i in range(1, b):
            codes.bitwise_or_(bit[:, i].to(dtype) << i)
    return out.view(n_rows, seg.n_cols)


def _little_endian_bytes(words: torch.Tensor) -> torch.Tensor:
    """The bytes of int32 ``words`` in little-endian order on a big-endian host."""
    return words.view(torch.uint8).view(-1, 4).flip(1).reshape(-1)


def unpack_codes(
    qweight: torch.Tensor, segments: list[Segment], n_rows: int, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """All codes (``dtype``, M x N) in storage order."""
    return torch.cat([unpack_segment(qweight, s, n_rows, dtype) for s in segments], dim=1)


def dequantize_weight(
    qweight: torch.Tensor,
    stored_bits: torch.Tensor,
    perm: torch.Tensor,
    range_min: torch.Tensor,
    range_max: torch.Tensor,
    group_index: torch.Tensor | None,
    n_rows: int,
) -> torch.Tensor:
    """The torch reference dequantization: fp32 weight (M x N) in the original column order."""
    segments = segments_from_bits(stored_bits, n_rows)
    codes = unpack_codes(qweight, segments, n_rows)
    gi = group_index.long() if group_index is not None else torch.zeros_like(perm, dtype=torch.long)
    mn = range_min[:, gi]  # M x N, per stored column
    mx = range_max[:, gi]
    scale, zero = grid(mn, mx, stored_bits.to(mn.device).unsqueeze(0))
    w_stored = dequantize_codes(codes, scale, zero)
    w = torch.empty_like(w_stored)
    w[:, perm.long()] = w_stored
    return w


# ----------------------------------------------------------------------------------------------
# the stored layout of one packed layer


@dataclass(frozen=True)
class TensorInfo:
    """Shape and safetensors dtype name (``"I32"``, ``"F16"``, ...) of one stored tensor."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"unknown safetensors dtype {self.dtype!r}")
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor's shape and dtype from a safetensors file's header, without loading the data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {
                key: TensorInfo(tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype())
                for key in f.keys()  # noqa: SIM118 - safe_open is not a mapping
            }
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}): truncated or damaged") from exc


def packed_layers(tensors: Mapping[str, TensorInfo]) -> dict[str, dict[str, TensorInfo]]:
    """The packed layers of a checkpoint listing: layer name -> {tensor name: info}, in listing order.

    A layer is recognised by its ``bits_header``; its tensors are the entries directly under its name.
    """
    layers: dict[str, dict[str, TensorInfo]] = {}
    for key in tensors:
        if key.endswith("." + HEADER_TENSOR):
            layers[key[: -len(HEADER_TENSOR) - 1]] = {}
    for key, info in tensors.items():
        layer, _, leaf = key.rpartition(".")
        if layer in layers:
            layers[layer][leaf] = info
    return layers


@dataclass(frozen=True)
class ModuleShape:
    """What the model (config.json) says about a layer that the checkpoint stores packed."""

    out_features: int
    in_features: int
    has_bias: bool


@dataclass(frozen=True)
class WeightShape:
    """The sizes every stored tensor of one packed layer derives from, and which optional ones it has."""

    out_features: int
    in_features: int
    n_words: int
    n_groups: int = 1
    optional: frozenset[str] = frozenset()  # names of the optional tensors present

    @classmethod
    def of(
        cls,
        out_features: int,
        in_features: int,
        n_words: int,
        group_size: int = -1,
        has_bias: bool = False,
        rotated: bool = False,
    ) -> WeightShape:
        """The shape of a layer with one range per row (group_size -1) or per ``group_size`` columns."""
        n_groups = 1 if group_size == -1 else in_features // group_size
        # one group spanning the row is the per-row layout (no group_index): group_size == in_features
        optional = {name for name, on in (("group_index", n_groups > 1), (BIAS, has_bias)) if on}
        optional |= set(ROTATION_NAMES) if rotated else set()
        return cls(out_features, in_features, n_words, n_groups, frozenset(optional))

    @property
    def grouped(self) -> bool:
        return "group_index" in self.optional

    @property
    def group_size(self) -> int:
        """-1 for one range per row, else the width of a range group."""
        return self.in_features // self.n_groups if self.grouped else -1

    @property
    def has_bias(self) -> bool:
        return BIAS in self.optional

    @property
    def rotated(self) -> bool:
        return ROTATION_SIGNS in self.optional

    def specs(self) -> tuple[TensorSpec, ...]:
        """The declared tensors this layer stores (the bias included, when it has one)."""
        return tuple(t for t in TENSORS if not t.optional or t.name in self.optional)

    def nbytes(self, bias_itemsize: int = 2) -> int:
        """Bytes of every stored tensor (the bias counted at ``bias_itemsize`` bytes per value)."""
        return sum(
            math.prod(t.shape(self)) * (t.dtype.itemsize if t.dtype is not None else bias_itemsize)
            for t in self.specs()
        )

    @classmethod
    def from_shapes(
        cls, shapes: Mapping[str, tuple[int, ...]], name: str, module: ModuleShape | None = None
    ) -> WeightShape:
        """The shape the stored tensors describe; raises ``ValueError`` naming the layer if they disagree.

        With ``module`` (what the model's config says), the shapes are checked against it first, so a
        checkpoint that does not belong to the model is reported as such.
        """
        shapes = {k: tuple(v) for k, v in shapes.items()}
        unknown = sorted(set(shapes) - set(TENSOR_NAMES))
        if unknown:
            raise ValueError(
                f"checkpoint layer {name!r} stores unknown tensor(s) {unknown}: written by a newer baq_hf "
                f"or damaged (this version stores {list(TENSOR_NAMES)}); upgrade baq_hf or re-quantize"
            )
        perm, header = shapes.get("perm"), shapes.get(HEADER_TENSOR)
        rmin, rmax = shapes.get("range_min"), shapes.get("range_max")
        if module is not None:
            _check_against_module(shapes, name, module)
        if perm is None or len(perm) != 1 or header != ((perm[0] + 1) // 2,):
            raise ValueError(
                f"checkpoint tensors {name}.perm/{HEADER_TENSOR} have shapes {perm}/{header}; expected (N,) "
                "and ((N + 1) // 2,)"
            )
        if rmin is None or len(rmin) != 2 or rmax != rmin:
            raise ValueError(
                f"checkpoint tensors {name}.range_min/range_max have shapes {rmin}/{rmax}, expected "
                "(out_features, groups) both"
            )
        n_in, (n_out, n_groups) = perm[0], rmin
        grouped = "group_index" in shapes
        if (n_groups != 1) != grouped or (grouped and (n_groups < 1 or n_in % n_groups)):
            raise ValueError(
                f"checkpoint tensors of {name} describe an inconsistent grouping ({n_groups} groups)"
            )
        if "weight" not in shapes or len(shapes["weight"]) != 1:
            raise ValueError(f"checkpoint tensor {name}.weight (the packed codes) is missing or not 1-D")
        optional = frozenset(t.name for t in TENSORS if t.optional and t.name in shapes)
        if len(optional & set(ROTATION_NAMES)) == 1:
            raise ValueError(
                f"checkpoint layer {name!r} stores {sorted(optional & set(ROTATION_NAMES))} alone: a rotated "
                f"layer stores both {list(ROTATION_NAMES)}; the checkpoint is damaged, re-quantize it"
            )
        shape = cls(n_out, n_in, shapes["weight"][0], n_groups, optional)
        for spec in shape.specs():
            if shapes[spec.name] != spec.shape(shape):
                raise ValueError(
                    f"checkpoint tensor {name}.{spec.name} has shape {shapes[spec.name]}, expected "
                    f"{spec.shape(shape)}"
                )
        return shape


def _check_against_module(shapes: Mapping[str, tuple[int, ...]], name: str, module: ModuleShape) -> None:
    n_in, n_out = module.in_features, module.out_features
    for tensor, shape in (("perm", (n_in,)), (HEADER_TENSOR, ((n_in + 1) // 2,))):
        if shapes.get(tensor) != shape:
            raise ValueError(
                f"checkpoint tensor {name}.{tensor} has shape {shapes.get(tensor)}, but the model's "
                f"{name} has in_features={n_in} (expected {shape}): checkpoint and config.json disagree"
            )
    rmin, rmax = shapes.get("range_min"), shapes.get("range_max")
    if rmin is None or len(rmin) != 2 or rmin[0] != n_out or rmax != rmin:
        raise ValueError(
            f"checkpoint tensors {name}.range_min/range_max have shapes {rmin}/{rmax}, expected "
            f"({n_out}, groups): checkpoint and config.json disagree"
        )
    if (BIAS in shapes) != module.has_bias:
        state = ("present", "has no") if BIAS in shapes else ("missing", "has a")
        raise ValueError(
            f"checkpoint tensor {name}.bias is {state[0]}, but the model's {name} {state[1]} bias: "
            "checkpoint and config.json disagree"
        )


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a packed layer stores: its name under the layer, dtype and shape rule.

    ``dtype`` None means any float dtype (the bias keeps the checkpoint's). An optional tensor is stored
    only by the layers that need it, and its presence in a checkpoint is what says so.
    """

    name: str
    dtype: torch.dtype | None
    shape: Callable[[WeightShape], tuple[int, ...]]
    optional: bool = False
    doc: str = ""

    def dtype_error(self, dtype: torch.dtype) -> str | None:
        """Why a stored tensor of ``dtype`` cannot be this one, or None (the loader checks header dtypes
        with it before transformers casts them, :func:`validate` the loaded tensors)."""
        expected = "a float dtype" if self.dtype is None else self.dtype
        fits = dtype.is_floating_point if self.dtype is None else dtype == self.dtype
        return None if fits else f"{self.name} has dtype {dtype}, expected {expected}"


# Every tensor of a packed layer, declared once: the modules, the loader, the validation, the size
# accounting, the kernel layouts and the docs' table all go through this list. The bias belongs to the
# module (a parameter), the others to the packed weight (:class:`BaqWeight`).
BIAS = "bias"
ROTATION_SIGNS, ROTATION_BLOCK = "rotation_signs", "rotation_block"
ROTATION_NAMES = (ROTATION_SIGNS, ROTATION_BLOCK)  # stored together or not at all
TENSORS: tuple[TensorSpec, ...] = (
    TensorSpec("weight", torch.int32, lambda s: (s.n_words,), doc="the packed codes (qweight)"),
    TensorSpec(HEADER_TENSOR, torch.uint8, lambda s: ((s.in_features + 1) // 2,), doc="4-bit bitwidths"),
    TensorSpec("perm", torch.int32, lambda s: (s.in_features,), doc="stored column -> input column"),
    TensorSpec("range_min", torch.float16, lambda s: (s.out_features, s.n_groups), doc="grid minimum"),
    TensorSpec("range_max", torch.float16, lambda s: (s.out_features, s.n_groups), doc="grid maximum"),
    TensorSpec("group_index", torch.int32, lambda s: (s.in_features,), True, "range group of a column"),
    TensorSpec(ROTATION_SIGNS, torch.int8, lambda s: (s.in_features,), True, "input rotation: +-1 signs S"),
    TensorSpec(ROTATION_BLOCK, torch.int32, lambda s: (1,), True, "input rotation: Hadamard block size"),
    TensorSpec(BIAS, None, lambda s: (s.out_features,), True, "the layer's bias, not quantized"),
)
TENSOR_NAMES = tuple(t.name for t in TENSORS)
OPTIONAL_NAMES = frozenset(t.name for t in TENSORS if t.optional)


class BaqWeight:
    """One packed weight: its stored tensors (the bias aside) under their stored names, and what they mean.

    The one owner of the format's semantics: :meth:`pack` builds it from GPTQ's codes,
    :meth:`from_stored` checks untrusted tensors, :meth:`dequantize` is the torch reference, and the
    sizes, per-column bitwidths and segments are derived here. ``BaqLinear`` holds its tensors as
    buffers and hands out a ``BaqWeight`` over them; kernels build their layouts from one.
    """

    def __init__(self, out_features: int, tensors: Mapping[str, torch.Tensor]):
        self.out_features = out_features
        self.tensors = {k: v for k, v in tensors.items() if v is not None}
        self.in_features = self.tensors["perm"].numel()
        self._stored_bits: torch.Tensor | None = None
        self._segments: list[Segment] | None = None
        self._rotation: Rotation | None = None

    qweight = property(lambda self: self.tensors["weight"], doc="the packed codes (int32 words)")
    bits_header = property(lambda self: self.tensors[HEADER_TENSOR])
    perm = property(lambda self: self.tensors["perm"])
    range_min = property(lambda self: self.tensors["range_min"])
    range_max = property(lambda self: self.tensors["range_max"])
    group_index = property(lambda self: self.tensors.get("group_index"))

    @property
    def rotation(self) -> Rotation | None:
        """The input rotation R of a rotated layer (read once: the block size is a host integer)."""
        if self._rotation is None and ROTATION_SIGNS in self.tensors:
            block = int(self.tensors[ROTATION_BLOCK].reshape(-1)[0])
            self._rotation = Rotation(self.tensors[ROTATION_SIGNS], block)
        return self._rotation

    @property
    def shape(self) -> WeightShape:
        optional = frozenset(n for n in self.tensors if n in OPTIONAL_NAMES)
        return WeightShape(
            self.out_features, self.in_features, self.qweight.numel(), self.range_min.shape[1], optional
        )

    @property
    def device(self) -> torch.device:
        return self.perm.device

    # ------------------------------------------------------------------ construction

    @classmethod
    def pack(
        cls,
        codes: torch.Tensor,
        bits: torch.Tensor,
        range_min: torch.Tensor,
        range_max: torch.Tensor,
        group_of_column: torch.Tensor | None,
        rotation: Rotation | None = None,
    ) -> BaqWeight:
        """Sort columns by bitwidth and pack them (``codes`` M x N, ``bits`` and groups in column order;
        with a ``rotation``, columns of the rotated weight)."""
        bits = bits.cpu().long()
        perm = torch.sort(bits, stable=True).indices
        stored_bits = bits[perm]
        tensors = {
            "weight": pack_codes(codes.cpu()[:, perm], stored_bits),
            HEADER_TENSOR: pack_header(stored_bits),
            "perm": perm.to(torch.int32),
            "range_min": range_min.cpu().half(),
            "range_max": range_max.cpu().half(),
        }
        if group_of_column is not None and range_min.shape[1] > 1:  # one group: the per-row layout
            tensors["group_index"] = group_of_column.cpu()[perm].to(torch.int32)
        if rotation is not None:
            tensors[ROTATION_SIGNS] = rotation.signs.cpu().to(torch.int8)
            tensors[ROTATION_BLOCK] = torch.tensor([rotation.block], dtype=torch.int32)
        return cls(codes.shape[0], tensors)

    @classmethod
    def empty(cls, shape: WeightShape, device: torch.device | str | None = None) -> BaqWeight:
        """Placeholder tensors of the right dtypes and shapes (an identity perm, ranges [0, 1])."""
        tensors = {}
        for spec in shape.specs():
            if spec.name == BIAS:
                continue
            t = torch.zeros(spec.shape(shape), dtype=spec.dtype, device=device)
            if spec.name == "perm":
                t = torch.arange(shape.in_features, dtype=spec.dtype, device=device)
            elif spec.name in ("range_max", ROTATION_SIGNS):
                t = torch.ones_like(t)
            elif spec.name == ROTATION_BLOCK:
                t = torch.full_like(t, shape.in_features)
            tensors[spec.name] = t
        return cls(shape.out_features, tensors)

    @classmethod
    def from_stored(cls, tensors: Mapping[str, torch.Tensor], name: str = "") -> BaqWeight:
        """The weight in untrusted stored tensors (a bias among them is checked too, and left out)."""
        shape = WeightShape.from_shapes({k: tuple(t.shape) for k, t in tensors.items()}, name)
        validate(shape, tensors, name)
        return cls(shape.out_features, {k: v for k, v in tensors.items() if k != BIAS})

    def to(self, device: torch.device | str) -> BaqWeight:
        return BaqWeight(self.out_features, {k: v.to(device) for k, v in self.tensors.items()})

    # ------------------------------------------------------------------ derived facts

    @property
    def stored_bits(self) -> torch.Tensor:
        """Bitwidth of every stored column (int64, CPU), sorted."""
        if self._stored_bits is None:
            self._stored_bits = unpack_header(self.bits_header.cpu(), self.in_features)
        return self._stored_bits

    @property
    def segments(self) -> list[Segment]:
        if self._segments is None:
            self._segments = segments_from_bits(self.stored_bits, self.out_features)
        return self._segments

    def column_bits(self) -> torch.Tensor:
        """Bitwidth of every input column, in the original column order."""
        bits = torch.empty_like(self.stored_bits)
        bits[self.perm.long().cpu()] = self.stored_bits
        return bits

    @property
    def code_bits(self) -> float:
        """Mean code bits per weight (the paper's "Avg. Bits")."""
        return float(self.stored_bits.float().mean()) if self.in_features else 0.0

    def nbytes(self) -> int:
        """Bytes of the stored tensors (the bias aside)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The torch reference: the dense weight (out x in, original column order), computed in fp32.

        For a rotated layer this is the stored, rotated weight W' (it acts on R x, exactly what GPTQ
        produced); :meth:`effective_weight` is the one that acts on x.
        """
        w = dequantize_weight(
            self.qweight,
            self.stored_bits.to(self.qweight.device),
            self.perm,
            self.range_min,
            self.range_max,
            self.group_index,
            self.out_features,
        )
        return w if dtype is None else w.to(dtype)

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight acting on un-rotated inputs: W' R for a rotated layer, else the same as
        :meth:`dequantize` (for a plain float model: ``model.dequantize()``)."""
        w = self.dequantize()
        if self.rotation is not None:
            w = self.rotation.unrotate_weight(w)
        return w if dtype is None else w.to(dtype)


def validate(shape: WeightShape, tensors: Mapping[str, torch.Tensor | None], name: str = "") -> None:
    """Check untrusted tensors of one packed layer against ``shape`` and each other, before anything runs.

    Dtypes and shapes, a sorted header whose segments need exactly the stored words, a true permutation,
    finite ordered ranges, group indices inside the stored groups, a finite bias.
    """

    def fail(what: str) -> None:
        raise ValueError(f"corrupt BAQ checkpoint: layer {name!r}: {what}")

    n, m = shape.in_features, shape.out_features
    for spec in shape.specs():
        t = tensors.get(spec.name)
        if t is None:
            fail(f"{spec.name} is missing")
        if (wrong := spec.dtype_error(t.dtype)) is not None:
            fail(wrong)
        if tuple(t.shape) != spec.shape(shape):
            fail(f"{spec.name} has shape {tuple(t.shape)}, expected {spec.shape(shape)}")
    try:
        segments = segments_from_bits(unpack_header(tensors[HEADER_TENSOR].cpu(), n), m)
    except ValueError as exc:
        fail(f"{HEADER_TENSOR}: {exc}")
    expected = total_words(segments, m)
    if shape.n_words != expected:
        fail(
            f"qweight (stored as {name}.weight) has {shape.n_words} words but the bits_header needs "
            f"{expected}"
        )
    perm = tensors["perm"].long().cpu()
    if not torch.equal(torch.sort(perm).values, torch.arange(n)):
        fail("perm is not a permutation of the input columns")
    rmin, rmax = tensors["range_min"].float(), tensors["range_max"].float()
    if not (torch.isfinite(rmin).all() and torch.isfinite(rmax).all()):
        fail("range_min/range_max contain NaN or inf")
    if not bool((rmax > rmin).all()):
        fail("range_max must exceed range_min in every row")
    group_index = tensors.get("group_index")
    if group_index is not None and n:
        gi = group_index.long()
        if int(gi.min()) < 0 or int(gi.max()) >= shape.n_groups:
            fail("group_index points outside the stored groups")
    present = [r for r in ROTATION_NAMES if tensors.get(r) is not None]
    if present and len(present) != len(ROTATION_NAMES):
        fail(f"{present} stored without {sorted(set(ROTATION_NAMES) - set(present))}: a rotation needs both")
    if present:
        signs = tensors[ROTATION_SIGNS]
        if not bool(((signs == 1) | (signs == -1)).all()):
            fail(f"{ROTATION_SIGNS} must hold only +1 and -1")
        block = int(tensors[ROTATION_BLOCK].reshape(-1)[0])
        if not 2 <= block <= max(n, 2) or n % block or hadamard_factor(block) is None:
            fail(
                f"{ROTATION_BLOCK}={block} is not a Hadamard size (K x 2^k, K in 1, 12, 20, 28, 36, ...) "
                f"dividing the {n} inputs"
            )
    bias = tensors.get(BIAS)
    if bias is not None and not bool(torch.isfinite(bias.float()).all()):
        fail("bias contains NaN or inf")
