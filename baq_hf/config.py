"""BaqConfig: the quantization settings, validated up front and stored in config.json."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from . import register
from .format import FORMAT_VERSION
from .specs import ALLOCATIONS, BUDGETS, MAX_BITS, ROTATIONS, WEIGHTINGS, SolverSpec


class BaqConfig(QuantizationConfigMixin):
    """Settings of GPTQ with BAQ per-column bit allocation.

    Args:
        bits: target mean code bits per weight of every quantized layer (e.g. 2.0, 2.25, 3).
        allocation: "baq" (exact integer optimum of sum_j C_j 2^-2R_j, default), "grid" (exact integer
            optimum of each column's real rounding error on its (2^R - 1)-step grid, R = 0 zeroing it),
            "paper" (Alg. 1-2 as written), "measured" (C_j from a first uniform GPTQ pass, as in the
            authors' code), or "uniform" (plain GPTQ).
        min_bits / max_bits: bounds of every column's bitwidth (0 drops a column; at most 15).
        group_size: columns sharing one quantization range; -1 = one range per row.
        sym: symmetric ranges (zero point in the middle).
        act_order: quantize columns by decreasing Hessian diagonal.
        damp_percent: Hessian damping as a fraction of mean(diag H) (the paper and GPTQ use 0.01).
        block_size: GPTQ lazy-update block width.
        dataset: calibration data: None (the shipped C4 sample), a path to a .txt/.jsonl file, a list of
            strings, or pre-tokenized ids (list of lists of ints).
        tokenizer: a tokenizer object or a name/path, needed for text calibration data; None loads the
            model's own tokenizer when the data is text.
        num_samples / seqlen / seed: number, length and sampling seed of calibration windows.
        modules_to_not_convert: module names (or name suffixes) left in full precision; lm_head and
            the embeddings are never quantized.
        clip_search: search a clipped range per row (or group) that minimises the Hessian-diagonal-
            weighted rounding error at the allocated bitwidths, instead of the min/max range.
        budget: "layer" (every layer gets ``bits`` on average) or "model" (the mean over all quantized
            weights is ``bits``; a first pass on the float model decides how bits move between layers).
        budget_weighting: how "model" prices a layer's output error: "fisher" (squared gradients of
            the calibration loss w.r.t. the layer's outputs, one backward pass) or "relative" (its
            output error relative to its output energy).
        budget_measurement: a file where "model" saves its first pass (or reads it, if it exists and
            was made with the same settings), so another ``bits`` is solved without measuring again.
        compare_uniform: also run uniform GPTQ on every layer to report the measured Ratio_L.
        rotation: None, or "hadamard": quantize every layer in a randomized Hadamard basis of its inputs
            (W x = (W S H^T)(H S x), incoherence processing as in QuIP), stored as the layer's random
            signs and applied to x in every forward; the signs come from ``seed`` and the layer's name.
        rotation_block: None (one transform over all inputs: sizes K x 2^k, K in 1, 12, 20, 28, 36, ...)
            or a block width: each layer rotates blocks of the largest Hadamard size that is at most
            this and divides its input size (so inputs mix only within a block).
        true_sequential: quantize the sub-layers of a block in execution order, each on the inputs
            produced by the already-quantized ones.
        resume_dir: a folder where the state after every block is saved; a rerun with the same folder,
            model, data and settings resumes after the last finished block.
        keep_float32: save the tensors that are not quantized (embeddings, norms, biases) of a float32
            model in float32. By default they are stored in 16 bits: a 16-bit model's own dtype, else
            bfloat16 (float32's range, so no value overflows; computation stays in the model's dtype).
        format_version: the stored format's version (see baq_hf.format.FORMAT_VERSION): set by
            ``save_pretrained``, read from a checkpoint's config.json (1 when the field is absent, as in
            checkpoints written before it existed); a checkpoint of a newer version is refused by name.
    """

    def __init__(
        self,
        bits: float = 2.0,
        allocation: str = "baq",
        min_bits: int = 0,
        max_bits: int = 8,
        group_size: int = -1,
        sym: bool = False,
        act_order: bool = False,
        damp_percent: float = 0.01,
        block_size: int = 128,
        dataset: Any = None,
        tokenizer: Any = None,
        num_samples: int = 128,
        seqlen: int = 2048,
        seed: int = 0,
        modules_to_not_convert: list[str] | None = None,
        clip_search: bool = False,
        budget: str = "layer",
        budget_weighting: str = "fisher",
        budget_measurement: str | None = None,
        compare_uniform: bool = False,
        rotation: str | None = None,
        rotation_block: int | None = None,
        true_sequential: bool = True,
        resume_dir: str | None = None,
        keep_float32: bool = False,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ):
        self.quant_method = "baq"
        self.bits = bits
        self.allocation = allocation
        self.min_bits = min_bits
        self.max_bits = max_bits
        self.group_size = group_size
        self.sym = sym
        self.act_order = act_order
        self.damp_percent = damp_percent
        self.block_size = block_size
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.seqlen = seqlen
        self.seed = seed
        self.modules_to_not_convert = modules_to_not_convert
        self.clip_search = clip_search
        self.budget = budget
        self.budget_weighting = budget_weighting
        self.budget_measurement = budget_measurement
        self.compare_uniform = compare_uniform
        self.rotation = rotation
        self.rotation_block = rotation_block
        self.true_sequential = true_sequential
        self.resume_dir = resume_dir
        self.keep_float32 = keep_float32
        self.format_version = format_version
        unknown = set(kwargs) - {"quant_method"}
        if unknown:
            raise ValueError(
                f"BaqConfig got unknown field(s) {sorted(unknown)}; valid fields are "
                f"{sorted(k for k in self.__dict__ if k != 'quant_method')}"
            )
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; each error names the field, the value and the fix."""

        def fail(field: str, fix: str) -> None:
            raise ValueError(f"BaqConfig.{field}={getattr(self, field)!r} is invalid: {fix}")

        if (
            isinstance(self.format_version, bool)
            or not isinstance(self.format_version, int)
            or self.format_version < 1
        ):
            fail("format_version", f"it must be an integer from 1 to {FORMAT_VERSION}")
        if self.format_version > FORMAT_VERSION:
            from . import __version__

            raise ValueError(
                f"this BAQ checkpoint was written in format version {self.format_version} by a newer "
                f"baq_hf; baq_hf {__version__} reads format versions 1 to {FORMAT_VERSION}: upgrade it "
                "(pip install -U baq_hf)"
            )
        if self.allocation not in ALLOCATIONS:
            fail("allocation", f"use one of {list(ALLOCATIONS)}")
        if self.budget not in BUDGETS:
            fail("budget", f"use one of {list(BUDGETS)}")
        if self.budget == "model" and self.allocation not in ("baq", "grid"):
            fail(
                "budget",
                "a model-wide budget re-allocates every layer's columns: use allocation 'baq' or 'grid'",
            )
        if self.budget_weighting not in WEIGHTINGS:
            fail("budget_weighting", f"use one of {list(WEIGHTINGS)}")
        if self.budget_measurement is not None and not isinstance(self.budget_measurement, (str, Path)):
            fail("budget_measurement", "give a file path or None")
        for field in ("min_bits", "max_bits", "group_size", "block_size", "num_samples", "seqlen", "seed"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(field, "it must be an integer")
        if not 0 <= self.min_bits <= MAX_BITS:
            fail("min_bits", f"it must lie in [0, {MAX_BITS}]")
        if not 1 <= self.max_bits <= MAX_BITS:
            fail("max_bits", f"it must lie in [1, {MAX_BITS}] (the bitwidth header has 4 bits)")
        if self.min_bits > self.max_bits:
            fail("min_bits", f"it must not exceed max_bits={self.max_bits}")
        if (
            isinstance(self.bits, bool)
            or not isinstance(self.bits, (int, float))
            or not math.isfinite(self.bits)
        ):
            fail("bits", "it must be a finite number such as 2, 2.25 or 3")
        if not self.min_bits <= self.bits <= self.max_bits:
            fail("bits", f"it must lie in [min_bits, max_bits] = [{self.min_bits}, {self.max_bits}]")
        if self.allocation == "uniform" and float(self.bits) != int(self.bits):
            fail("bits", "uniform allocation needs an integer bitwidth; use allocation='baq' for fractions")
        if self.allocation in ("uniform", "measured") and self.bits < 1:
            fail("bits", f"allocation={self.allocation!r} needs bits >= 1")
        if self.group_size != -1 and self.group_size < 1:
            fail("group_size", "use -1 (one range per row) or a positive group width such as 128")
        if self.block_size < 1:
            fail("block_size", "use a positive width such as 128")
        if isinstance(self.damp_percent, bool) or not isinstance(self.damp_percent, (int, float)):
            fail("damp_percent", "it must be a number in (0, 1]")
        if not 0 < self.damp_percent <= 1:
            fail("damp_percent", "it must lie in (0, 1]; the paper uses 0.01")
        for field in (
            "sym",
            "act_order",
            "clip_search",
            "compare_uniform",
            "true_sequential",
            "keep_float32",
        ):
            if not isinstance(getattr(self, field), bool):
                fail(field, "it must be True or False")
        if self.rotation is not None and self.rotation not in ROTATIONS:
            fail("rotation", f"use None or one of {list(ROTATIONS)}")
        if self.rotation_block is not None:
            if isinstance(self.rotation_block, bool) or not isinstance(self.rotation_block, int):
                fail("rotation_block", "give None or an integer block width such as 64 or 128")
            if self.rotation_block < 2:
                fail(
                    "rotation_block",
                    "use a block width of at least 2 (64 to 256 keep the variance between blocks)",
                )
            if self.rotation is None:
                fail("rotation_block", "it needs rotation='hadamard'")
        if self.num_samples < 1:
            fail("num_samples", "use at least 1 calibration window (GPTQ uses 128)")
        if self.seqlen < 2:
            fail("seqlen", "use at least 2 tokens per window (GPTQ uses 2048)")
        if self.resume_dir is not None and not isinstance(self.resume_dir, (str, Path)):
            fail("resume_dir", "give a folder path or None")
        if self.modules_to_not_convert is not None and (
            not isinstance(self.modules_to_not_convert, (list, tuple))
            or not all(isinstance(m, str) for m in self.modules_to_not_convert)
        ):
            fail("modules_to_not_convert", "give a list of module names")
        dataset_ok = isinstance(self.dataset, (str, Path, list, tuple)) or hasattr(self.dataset, "shape")
        if self.dataset is not None and not dataset_ok:
            fail("dataset", "give a path to a .txt/.jsonl file, a list of strings, or token ids")
        tokenizer_ok = isinstance(self.tokenizer, str) or (
            callable(self.tokenizer) and hasattr(self.tokenizer, "encode")
        )
        if self.tokenizer is not None and not tokenizer_ok:
            fail(
                "tokenizer",
                "give None (loaded from the model folder), a tokenizer name or folder path (str), or a "
                "tokenizer object such as AutoTokenizer.from_pretrained(...) (callable, with .encode)",
            )

    def solver_spec(self) -> SolverSpec:
        """The plain settings the GPTQ solver takes (it does not depend on transformers)."""
        return SolverSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SolverSpec)})

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """The config of a saved checkpoint: one written before ``keep_float32`` existed kept float32, and one
        without ``format_version`` is of version 1."""
        defaults = {"keep_float32": True, "format_version": 1}
        return super().from_dict({**defaults, **config_dict}, return_unused_kwargs, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Serializable settings; calibration data and tokenizer objects are not stored in config.json."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in ("dataset", "tokenizer")}
        out["dataset"] = str(self.dataset) if isinstance(self.dataset, (str, Path)) else None
        out["tokenizer"] = self.tokenizer if isinstance(self.tokenizer, str) else None
        out["format_version"] = FORMAT_VERSION  # what this baq_hf writes, whatever version it read
        return out

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


register()  # transformers is imported now (see baq_hf.register)
