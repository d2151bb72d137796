"""One bit budget for the whole model: per-layer error curves, per-layer weights, and their solution.

Layers differ in how much their output error costs the model. A first pass over the float model
measures, for every quantized layer, each column's real rounding error at every bitwidth (the table
the "grid" allocation uses) and a weight that converts the layer's output error into model loss. A
Lagrangian over all columns of all layers (a column's bit costs its rows) then splits the model's
bits between layers; the second pass is the usual block-by-block GPTQ with each layer's share, its
columns re-allocated on the real Hessian. The measurement is saved so that other targets can be
solved without recollecting it (as EXL2's measurement file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import allocation as alloc
from .filemode import save_file
from .gptq import prepare, rounding_errors
from .specs import WEIGHTINGS, SolverSpec

FORMAT_VERSION = 1


@dataclass
class LayerMeasurement:
    """What the model-wide solve needs of one layer."""

    errors: torch.Tensor  # N x K: GPTQ loss of each column rounded alone at min_bits + r bits
    rows: int
    output_energy: float  # tr(W H W^T): the layer's output energy on the calibration data
    gradient_energy: float  # mean squared gradient of the loss w.r.t. the layer's outputs


def measure_layer(
    w: torch.Tensor, h: torch.Tensor, spec: SolverSpec, name: str = ""
) -> tuple[torch.Tensor, float]:
    """The error table and output energy of one float layer (out x in weight, its Hessian)."""
    prep = prepare(w, h, spec, name)
    errors = rounding_errors(prep, spec.group_size, spec.sym, spec.min_bits, spec.max_bits)
    energy = float(((prep.w @ prep.h) * prep.w).sum())
    return errors, energy


def layer_weight(m: LayerMeasurement, weighting: str) -> float:
    """Model loss per unit of the layer's GPTQ loss (output error), up to one factor shared by all layers.

    "fisher": the mean squared gradient of the calibration loss w.r.t. the layer's outputs (a diagonal,
    isotropic Fisher approximation: loss change ~ g^2 x output error). "relative": 1 / output energy,
    i.e. every layer's relative output error counts the same (EXL2's measure).
    """
    if weighting == "fisher":
        return m.gradient_energy
    if weighting == "relative":
        return 1.0 / m.output_energy if m.output_energy > 0 else 0.0
    raise ValueError(f"unknown budget weighting {weighting!r}; use one of {list(WEIGHTINGS)}")


def solve(
    measurements: dict[str, LayerMeasurement], target_bits: float, min_bits: int, weighting: str
) -> dict[str, float]:
    """Target mean bits per layer such that the model's weights average ``target_bits`` code bits."""
    names = list(measurements)
    tables = [measurements[n].errors for n in names]
    weights = [layer_weight(measurements[n], weighting) for n in names]
    rows = [measurements[n].rows for n in names]
    per_layer = alloc.allocate_across_layers(tables, weights, rows, target_bits, min_bits)
    return {n: b / measurements[n].errors.shape[0] for n, b in zip(names, per_layer, strict=True)}


def save(path: str | Path, measurements: dict[str, LayerMeasurement], settings: dict) -> None:
    """Write the measurement as safetensors (tables) with the scalars and settings in its metadata."""
    tensors = {f"{n}.errors": m.errors.contiguous() for n, m in measurements.items()}
    scalars = {n: [m.rows, m.output_energy, m.gradient_energy] for n, m in measurements.items()}
    meta = {"version": str(FORMAT_VERSION), "settings": json.dumps(settings), "layers": json.dumps(scalars)}
    save_file(tensors, path, metadata=meta)


def load(path: str | Path, settings: dict) -> dict[str, LayerMeasurement]:
    """Read a measurement written by :func:`save` for the same settings, or explain the mismatch."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("version") != str(FORMAT_VERSION) or "layers" not in meta:
        raise ValueError(f"{path} is not a baq_hf budget measurement (version {FORMAT_VERSION}); delete it")
    stored = json.loads(meta.get("settings", "{}"))
    if stored != settings:
        diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        raise ValueError(
            f"the budget measurement {path} was made with other settings ({', '.join(diff)}); "
            "delete it or point budget_measurement elsewhere to measure again"
        )
    tensors = load_file(str(path))
    scalars = json.loads(meta["layers"])
    return {
        n: LayerMeasurement(tensors[f"{n}.errors"], int(r), float(e), float(g))
        for n, (r, e, g) in scalars.items()
    }
