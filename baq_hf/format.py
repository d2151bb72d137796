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

- ``bias`` (M, only when the layer has one): not quantized, in a float dtype of the checkpoint's choice.

:class:`PackedLayout` is the one description of these tensors (names, dtypes, shapes): the loader, the
report, the resume code and ``BaqLinear`` all build and check layers through it, and
:func:`read_safetensors_header` reads shapes and dtypes without loading tensors.

The grid of a row (or group) with range [mn, mx] at R bits is GPTQ's asymmetric grid, derived from the
fp16 range in fp32: ``scale = (mx - mn) / (2^R - 1)``, ``zero = floor(-mn / scale + 1/2)``, and a code q
dequantizes to ``scale * (q - zero)``. The quantizer and every dequantization path (torch, Triton)
evaluate exactly these fp32 operations, so a reloaded checkpoint reproduces GPTQ's weights bit for bit.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

HEADER_BITS = 4
MAX_BITS = 2**HEADER_BITS - 1

# Codes unpacked per chunk on CPU, to bound the int64 temporaries of large layers.
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


def unpack_segment(qweight: torch.Tensor, seg: Segment, n_rows: int) -> torch.Tensor:
    """Codes (int64, M x n_cols) of one segment, read from the dense bitstream."""
    if seg.bits == 0:
        return torch.zeros(n_rows, seg.n_cols, dtype=torch.int64, device=qweight.device)
    words = qweight[seg.word_start : seg.word_start + seg.n_words(n_rows)].to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, words.new_zeros(1)])  # a code may straddle into the next word
    n = n_rows * seg.n_cols
    mask = (1 << seg.bits) - 1
    out = torch.empty(n, dtype=torch.int64, device=qweight.device)
    for start in range(0, n, _UNPACK_CHUNK):
        idx = torch.arange(start, min(n, start + _UNPACK_CHUNK), device=qweight.device, dtype=torch.int64)
        bit = idx * seg.bits
        lo = words[bit >> 5]
        hi = words[(bit >> 5) + 1]
        out[start : start + idx.numel()] = (((hi << 32) | lo) >> (bit & 31)) & mask
    return out.view(n_rows, seg.n_cols)


def unpack_codes(qweight: torch.Tensor, segments: list[Segment], n_rows: int) -> torch.Tensor:
    """All codes (int64, M x N) in storage order."""
    return torch.cat([unpack_segment(qweight, s, n_rows) for s in segments], dim=1)


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
class PackedLayout:
    """The tensors one packed layer stores: names, dtypes and shapes (the table in docs/format.md).

    ``group_size`` is -1 for one range per row, else the width of a range group (``group_index`` is
    then stored). Built from shapes read from a safetensors header or a state dict with
    :meth:`from_shapes`, which checks that they describe one consistent layer.
    """

    out_features: int
    in_features: int
    n_words: int
    group_size: int = -1
    has_bias: bool = False

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size == -1 else self.in_features // self.group_size

    def specs(self) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
        """Tensor name -> (dtype, shape) of every stored tensor; the bias' dtype (None) is any float."""
        n, m = self.in_features, self.out_features
        specs: dict[str, tuple[torch.dtype | None, tuple[int, ...]]] = {
            "weight": (torch.int32, (self.n_words,)),
            HEADER_TENSOR: (torch.uint8, ((n + 1) // 2,)),
            "perm": (torch.int32, (n,)),
            "range_min": (torch.float16, (m, self.n_groups)),
            "range_max": (torch.float16, (m, self.n_groups)),
        }
        if self.group_size != -1:
            specs["group_index"] = (torch.int32, (n,))
        if self.has_bias:
            specs["bias"] = (None, (m,))
        return specs

    @classmethod
    def from_shapes(
        cls, shapes: Mapping[str, tuple[int, ...]], name: str, module: ModuleShape | None = None
    ) -> PackedLayout:
        """The layout the stored shapes describe; raises ``ValueError`` naming the layer if they disagree.

        With ``module`` (what the model's config says), the shapes are checked against it first, so a
        checkpoint that does not belong to the model is reported as such.
        """
        shapes = {k: tuple(v) for k, v in shapes.items()}
        perm, header = shapes.get("perm"), shapes.get(HEADER_TENSOR)
        rmin, rmax = shapes.get("range_min"), shapes.get("range_max")
        if module is not None:
            n_in, n_out = module.in_features, module.out_features
            for tensor, shape in (("perm", (n_in,)), (HEADER_TENSOR, ((n_in + 1) // 2,))):
                if shapes.get(tensor) != shape:
                    raise ValueError(
                        f"checkpoint tensor {name}.{tensor} has shape {shapes.get(tensor)}, but the model's "
                        f"{name} has in_features={n_in} (expected {shape}): checkpoint and config.json "
                        "disagree"
                    )
            if rmin is None or len(rmin) != 2 or rmin[0] != n_out or rmax != rmin:
                raise ValueError(
                    f"checkpoint tensors {name}.range_min/range_max have shapes {rmin}/{rmax}, expected "
                    f"({n_out}, groups): checkpoint and config.json disagree"
                )
            if ("bias" in shapes) != module.has_bias:
                state = ("present", "has no") if "bias" in shapes else ("missing", "has a")
                raise ValueError(
                    f"checkpoint tensor {name}.bias is {state[0]}, but the model's {name} {state[1]} bias: "
                    "checkpoint and config.json disagree"
                )
        if perm is None or len(perm) != 1 or header != ((perm[0] + 1) // 2,):
            raise ValueError(
                f"checkpoint tensors {name}.perm/{HEADER_TENSOR} have shapes {perm}/{header}; expected (N,) "
                "and ((N + 1) // 2,)"
            )
        n_in = perm[0]
        if rmin is None or len(rmin) != 2 or rmax != rmin:
            raise ValueError(
                f"checkpoint tensors {name}.range_min/range_max have shapes {rmin}/{rmax}, expected "
                "(out_features, groups) both"
            )
        n_out, n_groups = rmin
        grouped = "group_index" in shapes
        if (n_groups != 1) != grouped or (grouped and (n_groups < 1 or n_in % n_groups)):
            raise ValueError(
                f"checkpoint tensors of {name} describe an inconsistent grouping ({n_groups} groups)"
            )
        if "weight" not in shapes or len(shapes["weight"]) != 1:
            raise ValueError(f"checkpoint tensor {name}.weight (the packed codes) is missing or not 1-D")
        return cls(
            out_features=n_out,
            in_features=n_in,
            n_words=shapes["weight"][0],
            group_size=n_in // n_groups if grouped else -1,
            has_bias="bias" in shapes,
        )

    def validate(self, tensors: Mapping[str, torch.Tensor | None], name: str = "") -> None:
        """Check untrusted tensors of this layout against it and each other, before anything runs.

        Dtypes and shapes, a sorted header whose segments need exactly the stored words, a true
        permutation, finite ordered ranges, group indices inside the stored groups, a finite bias.
        """

        def fail(what: str) -> None:
            raise ValueError(f"corrupt BAQ checkpoint: layer {name!r}: {what}")

        n, m = self.in_features, self.out_features
        for tensor_name, (dtype, shape) in self.specs().items():
            t = tensors.get(tensor_name)
            if t is None:
                fail(f"{tensor_name} is missing")
            if dtype is not None and t.dtype != dtype:
                fail(f"{tensor_name} has dtype {t.dtype}, expected {dtype}")
            if dtype is None and not t.is_floating_point():
                fail(f"{tensor_name} has dtype {t.dtype}, expected a float dtype")
            if tuple(t.shape) != shape:
                fail(f"{tensor_name} has shape {tuple(t.shape)}, expected {shape}")
        try:
            segments = segments_from_bits(unpack_header(tensors[HEADER_TENSOR].cpu(), n), m)
        except ValueError as exc:
            fail(f"{HEADER_TENSOR}: {exc}")
        expected = total_words(segments, m)
        if self.n_words != expected:
            fail(
                f"qweight (stored as {name}.weight) has {self.n_words} words but the bits_header needs "
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
            if int(gi.min()) < 0 or int(gi.max()) >= self.n_groups:
                fail("group_index points outside the stored groups")
        bias = tensors.get("bias")
        if bias is not None and not bool(torch.isfinite(bias.float()).all()):
            fail("bias contains NaN or inf")


@dataclass(frozen=True)
class PackedWeight:
    """The stored tensors of one quantized weight (the bias aside), as :func:`pack_weight` makes them."""

    shape: tuple[int, int]  # (out_features, in_features)
    qweight: torch.Tensor
    bits_header: torch.Tensor
    perm: torch.Tensor
    range_min: torch.Tensor
    range_max: torch.Tensor
    group_index: torch.Tensor | None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors under their stored names (``qweight`` is stored as ``weight``)."""
        out = {
            "weight": self.qweight,
            HEADER_TENSOR: self.bits_header,
            "perm": self.perm,
            "range_min": self.range_min,
            "range_max": self.range_max,
        }
        if self.group_index is not None:
            out["group_index"] = self.group_index
        return out


def pack_weight(
    codes: torch.Tensor,
    bits: torch.Tensor,
    range_min: torch.Tensor,
    range_max: torch.Tensor,
    group_of_column: torch.Tensor | None,
) -> PackedWeight:
    """Sort columns by bitwidth and pack them.

    ``codes`` (M x N), ``bits`` (N) and ``group_of_column`` (N) are in the original column order.
    """
    bits = bits.cpu().long()
    perm = torch.sort(bits, stable=True).indices
    stored_bits = bits[perm]
    qweight = pack_codes(codes.cpu()[:, perm], stored_bits)
    return PackedWeight(
        shape=tuple(codes.shape),
        qweight=qweight,
        bits_header=pack_header(stored_bits),
        perm=perm.to(torch.int32),
        range_min=range_min.cpu().half(),
        range_max=range_max.cpu().half(),
        group_index=None if group_of_column is None else group_of_column.cpu()[perm].to(torch.int32),
    )
