"""GPTQ with a per-column bitwidth (the solver BAQ plugs its allocation into).

Faithful to the reference GPTQ: Hessian damping by a fraction of mean(diag H), dead inputs zeroed,
optional act_order, the upper Cholesky factor U of H^-1, lazy block updates, group ranges fitted on
the weights as updated when the group starts. The changes: column j is rounded onto a grid of 2^R_j
levels of its row's (or group's) range, with R_j = 0 meaning "set to 0 and compensate"; ranges may be
clipped (clipping.py); and a group starting inside a block sees that block's pending updates.

The solver knows nothing of transformers: it takes a :class:`SolverSpec` and tensors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from . import allocation as alloc
from . import clipping
from . import format as fmt
from .rotation import Rotation
from .specs import MAX_BITS, SolverSpec

logger = logging.getLogger(__name__)

DAMP_RETRIES = 4


class HessianAccumulator:
    """Running mean H = 2/n sum_t x_t x_t^T over all calibration tokens, in fp32."""

    def __init__(self, n_cols: int, device: torch.device, name: str = ""):
        self.h = torch.zeros(n_cols, n_cols, dtype=torch.float32, device=device)
        self.n = 0
        self.name = name

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.h.device, torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"calibration inputs of layer {self.name!r} contain NaN or inf; the model or the "
                "quantized layers before it produce non-finite activations (check the weights and dtype)"
            )
        t = x.shape[0]
        self.h.mul_(self.n / (self.n + t))
        self.n += t
        x = x * (2.0 / self.n) ** 0.5
        self.h.addmm_(x.t(), x)


@dataclass
class PreparedLayer:
    """A layer's weight and Hessian in quantization order, with U = chol(H_damped^-1)."""

    w: torch.Tensor  # M x N fp32, columns in quantization order, dead columns zeroed
    h: torch.Tensor  # undamped Hessian in quantization order
    u: torch.Tensor  # upper Cholesky factor of the damped inverse
    perm: torch.Tensor  # quantization order -> original column
    dead: torch.Tensor  # bool, quantization order
    rotation: Rotation | None = None  # w and h are in the rotated basis of the inputs (spec.rotation)


@dataclass
class SolveResult:
    """GPTQ's output in quantization order."""

    q: torch.Tensor  # dequantized weight
    codes: torch.Tensor
    column_loss: torch.Tensor  # sum_i (w_ij - q_ij)^2 / d_j^2 (GPTQ's loss, without its 1/2)
    range_min: torch.Tensor  # fp16, M x G
    range_max: torch.Tensor
    rounding_score: torch.Tensor  # per row: sum_j H_jj (w_ij - round(w_ij))^2 on the ranges, before GPTQ


@dataclass
class LayerResult:
    """A quantized layer in the original column order, plus its allocation report."""

    q: torch.Tensor
    codes: torch.Tensor
    bits: torch.Tensor
    range_min: torch.Tensor
    range_max: torch.Tensor
    group_of_column: torch.Tensor | None
    stats: dict = field(default_factory=dict)
    rotation: Rotation | None = None  # q, codes and bits are in the rotated basis of the inputs

    def pack(self) -> fmt.BaqWeight:
        """The packed weight of this result (the last part of the per-layer step)."""
        return fmt.BaqWeight.pack(
            self.codes, self.bits, self.range_min, self.range_max, self.group_of_column, self.rotation
        )

    def effective_weight(self) -> torch.Tensor:
        """The quantized weight acting on un-rotated inputs (q itself without a rotation)."""
        return self.q if self.rotation is None else self.rotation.unrotate_weight(self.q)


def prepare(w: torch.Tensor, h: torch.Tensor, spec: SolverSpec, name: str = "") -> PreparedLayer:
    """The first part of the per-layer step, shared by quantization and the model budget's measurement:
    (weight, Hessian) -> dead inputs zeroed -> rotation (spec.rotation: W R^T, R H R^T) -> act_order
    -> damped Cholesky factor of H^-1."""
    damp_percent, act_order = spec.damp_percent, spec.act_order
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(
            f"weights of layer {name!r} contain NaN or inf; fix the checkpoint before quantizing"
        )
    dead = torch.diag(h) == 0
    w[:, dead] = 0.0
    rotation = None
    if spec.rotation is not None:
        rotation = Rotation.for_layer(w.shape[1], spec.seed, name, spec.rotation_block)
        w, h = rotation.rotate_weight(w), rotation.rotate_hessian(h)
        dead = torch.diag(h) == 0
        w[:, dead] = 0.0
    h[dead, dead] = 1.0
    n = h.shape[0]
    perm = torch.arange(n, device=w.device)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h, dead = w[:, perm], h[perm][:, perm], dead[perm]
    damp = damp_percent * float(torch.mean(torch.diag(h)))
    eye = torch.eye(n, device=h.device)
    for attempt in range(DAMP_RETRIES + 1):
        try:
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(h + damp * eye))
            u = torch.linalg.cholesky(hinv, upper=True)
            break
        except torch.linalg.LinAlgError:
            if attempt == DAMP_RETRIES:
                raise ValueError(
                    f"the Hessian of layer {name!r} is not positive definite even with damping {damp:.3g}; "
                    "use more or more varied calibration data, or a larger damp_percent"
                ) from None
            damp *= 10.0
            logger.warning("layer %s: Hessian not positive definite, retrying with damping %.3g", name, damp)
    h_undamped = h.clone()
    h_undamped[dead, dead] = 0.0
    return PreparedLayer(w=w, h=h_undamped, u=u, perm=perm, dead=dead, rotation=rotation)


def _initial_ranges(w: torch.Tensor, group_size: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 min/max ranges (M x G) of the weights before GPTQ: per row (G = 1) or per group."""
    n = w.shape[1]
    width = n if group_size == -1 else group_size
    pairs = [fmt.fit_range(w[:, g : g + width], sym) for g in range(0, n, width)]
    return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)


def _group_of_column(n: int, group_size: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long) if group_size == -1 else torch.arange(n) // group_size


def sensitivities(prep: PreparedLayer, group_size: int, sym: bool) -> torch.Tensor:
    """C_j (quantization order) from the initial min/max ranges and d_j = U[j, j]."""
    mn, mx = _initial_ranges(prep.w, group_size, sym)
    per_group = ((mx.float() - mn.float()) ** 2).sum(dim=0)  # G
    gidx = _group_of_column(prep.w.shape[1], group_size)
    return alloc.sensitivities(per_group.cpu()[gidx], torch.diag(prep.u).cpu(), prep.dead.cpu())


def rounding_errors(prep: PreparedLayer, group_size: int, sym: bool, min_bits: int, max_bits: int):
    """GPTQ's loss of every column rounded alone at every bitwidth: N x (max_bits - min_bits + 1).

    Entry (j, r) is sum_i (w_ij - q_ij)^2 / d_j^2 with q on the real grid of min_bits + r bits over the
    column's initial min/max range: 2^R - 1 steps, and R = 0 zeroes the column (error = its energy).
    This is what the loss model C_j 4^-R approximates, and where it is far off (R <= 2) it matters most.
    """
    mn, mx = _initial_ranges(prep.w, group_size, sym)
    gidx = _group_of_column(prep.w.shape[1], group_size).to(mn.device)
    mn_col, mx_col = mn[:, gidx], mx[:, gidx]  # M x N
    inv_d2 = 1.0 / torch.diag(prep.u).double() ** 2
    table = []
    for b in range(min_bits, max_bits + 1):
        scale, zero = fmt.grid(mn_col, mx_col, b)
        q = fmt.dequantize_codes(fmt.quantize_codes(prep.w, scale, zero, b), scale, zero)
        table.append(((prep.w - q) ** 2).sum(dim=0).double() * inv_d2)
    errors = torch.stack(table, dim=1).cpu()
    errors[prep.dead.cpu()] = 0.0
    return errors


def _up_to_date_group(
    w: torch.Tensor,
    w1: torch.Tensor,
    err1: torch.Tensor,
    u: torch.Tensor,
    i1: int,
    i2: int,
    i: int,
    width: int,
) -> torch.Tensor:
    """Weights of the group starting at column i1 + i with every earlier column's update applied.

    Inside the current block they are in ``w1``; columns past the block still miss this block's lazy
    update, which is applied here to a copy (GPTQ's reference reads the stale ``w`` in both places).
    """
    col = i1 + i
    end = min(col + width, w.shape[1])
    if end <= i2:
        return w1[:, i : i + end - col]
    tail = w[:, i2:end] - err1[:, :i] @ u[i1 : i1 + i, i2:end]
    return torch.cat([w1[:, i:], tail], dim=1)


def solve(prep: PreparedLayer, bits: torch.Tensor, spec: SolverSpec) -> SolveResult:
    """Run GPTQ over the columns (in quantization order) with bitwidth bits[j] for column j.

    Per-row ranges are fitted once on the initial weights; group ranges when the group starts, on the
    weights as updated so far. With ``spec.clip_search`` each range is the best clipped one for the
    columns' own bitwidths, weighted by the Hessian diagonal.
    """
    w = prep.w.clone()
    u = prep.u
    n = w.shape[1]
    device = w.device
    bits = bits.to(device)
    bits_list = bits.tolist()
    h_diag = torch.diag(prep.h)
    bit_values = torch.arange(MAX_BITS + 1, device=device)
    q_all = torch.zeros_like(w)
    codes_all = torch.zeros_like(w)
    losses = torch.zeros(n, device=device)
    mins, maxs = [], []

    rounding_score = torch.zeros(w.shape[0], device=device)

    def fit(block: torch.Tensor, col: int):
        nonlocal rounding_score
        cols = slice(col, col + block.shape[1])
        mn, mx, err = clipping.fit_ranges(block, bits[cols], h_diag[cols], spec.sym, spec.clip_search)
        rounding_score = rounding_score + err
        mins.append(mn)
        maxs.append(mx)
        return fmt.grid(mn.unsqueeze(1), mx.unsqueeze(1), bit_values.unsqueeze(0))  # M x 16 each

    if spec.group_size == -1:
        scale_tab, zero_tab = fit(w, 0)
    for i1 in range(0, n, spec.block_size):
        i2 = min(i1 + spec.block_size, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if spec.group_size != -1 and col % spec.group_size == 0:
                group = _up_to_date_group(w, w1, err1, u, i1, i2, i, spec.group_size)
                scale_tab, zero_tab = fit(group, col)
            x = w1[:, i]
            d = hinv1[i, i]
            b = bits_list[col]
            scale, zero = scale_tab[:, b], zero_tab[:, b]
            codes = fmt.quantize_codes(x, scale, zero, b)
            q = fmt.dequantize_codes(codes, scale, zero)
            q_all[:, col] = q
            codes_all[:, col] = codes
            losses[col] = ((x - q) ** 2).sum() / d**2
            e = (x - q) / d
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return SolveResult(
        q=q_all,
        codes=codes_all,
        column_loss=losses.cpu(),
        range_min=torch.stack(mins, 1).cpu(),
        range_max=torch.stack(maxs, 1).cpu(),
        rounding_score=rounding_score,
    )


def row_losses(prep: PreparedLayer, q: torch.Tensor) -> torch.Tensor:
    """Each row's calibration loss e_i H e_i^T, e_i = w_i - q_i: rows are quantized independently."""
    e = prep.w - q
    return ((e @ prep.h) * e).sum(dim=1)


def output_loss(prep: PreparedLayer, q: torch.Tensor) -> float:
    """The layer's calibration loss tr(E H E^T), E = W - Q (proportional to the output MSE)."""
    return float(row_losses(prep, q).sum())


def _guard_clipping(prep: PreparedLayer, bits: torch.Tensor, spec: SolverSpec, clipped: SolveResult):
    """Fall back to min/max ranges in rows where GPTQ on the clipped ranges went unstable.

    GPTQ's updates can push a row's remaining weights outside a clipped range, where they saturate and
    feed ever larger errors forward. Measured on SmolLM2 layer 0 o_proj at 3 bits: one row's loss grew
    84x and the layer's 6.9x over min/max ranges. A row's GPTQ loss is normally a few percent of its
    rounding score (its H-diagonal-weighted rounding error before GPTQ: median 3-5% on that layer, at
    most 17% on every row but the broken one, which had 640%); rows above their score are solved again
    with min/max ranges (rows are independent) and the better result stays.
    """
    clipped_rows = row_losses(prep, clipped.q)
    suspect = torch.nonzero(clipped_rows > clipped.rounding_score.to(clipped_rows.device)).flatten()
    if suspect.numel() == 0:
        return clipped
    rows = dataclasses.replace(prep, w=prep.w[suspect])
    plain = solve(rows, bits, dataclasses.replace(spec, clip_search=False))
    better = row_losses(rows, plain.q) < clipped_rows[suspect]
    take, src = suspect[better], torch.nonzero(better).flatten()
    for name in ("q", "codes", "range_min", "range_max"):
        target, source = getattr(clipped, name), getattr(plain, name)
        target[take.to(target.device)] = source[src.to(source.device)]
    logger.info("clip search fell back to min/max ranges in %d of %d rows", take.numel(), prep.w.shape[0])
    return clipped


def _uniform_neighbours(bits: float) -> list[int]:
    """Integer bitwidths a uniform baseline can have at this target: itself, or both neighbours."""
    low = max(1, math.floor(bits))
    return [low] if float(bits) == low else [low, low + 1]


def _add_ratios(stats: dict, key: str, by_bits: dict[int, float]) -> None:
    """A uniform comparison at an integer target is one number; at a fractional one no uniform run has
    the same storage, so ``key`` is None and ``key + "_vs"`` holds the ratio to both integer neighbours."""
    if len(by_bits) == 1:
        stats[key] = next(iter(by_bits.values()))
    else:
        stats[key] = None
        stats[key + "_vs"] = {str(r): v for r, v in by_bits.items()}


def _allocate(prep: PreparedLayer, c: torch.Tensor, spec: SolverSpec) -> torch.Tensor:
    n = prep.w.shape[1]
    if spec.allocation == "grid":
        errors = rounding_errors(prep, spec.group_size, spec.sym, spec.min_bits, spec.max_bits)
        return alloc.allocate_exact(errors, spec.bits, spec.min_bits, prep.dead.cpu())
    if spec.allocation == "measured":
        pass1_bits = max(1, round(spec.bits))
        pass1 = solve(prep, alloc.allocate_uniform(n, pass1_bits), spec)
        c = torch.where(prep.dead.cpu(), torch.zeros_like(pass1.column_loss), pass1.column_loss)
        c = c.double() * 4.0**pass1_bits
    return alloc.allocate(spec.allocation, c, spec.bits, spec.min_bits, spec.max_bits)


def quantize_weight(w: torch.Tensor, h: torch.Tensor, spec: SolverSpec, name: str = "") -> LayerResult:
    """Quantize one weight (out x in) given its Hessian, allocating bits as the spec says."""
    start = time.perf_counter()
    prep = prepare(w, h, spec, name)
    n = prep.w.shape[1]
    gs = spec.group_size
    if gs != -1 and n % gs:
        raise ValueError(
            f"group_size={gs} does not divide in_features={n} of layer {name!r}; "
            "choose a divisor or list the layer in modules_to_not_convert"
        )
    c = sensitivities(prep, gs, spec.sym)
    bits = _allocate(prep, c, spec)
    result = solve(prep, bits, spec)
    if spec.clip_search:
        result = _guard_clipping(prep, bits, spec, result)
    loss = output_loss(prep, result.q)
    stats = {
        "code_bits": float(bits.double().mean()),
        "bit_histogram": torch.bincount(bits, minlength=spec.max_bits + 1).tolist(),
        "ratio_c": alloc.ratio_c(c),
        "loss": loss,
    }
    model_ratios = {
        r: alloc.model_loss(c, bits) / max(alloc.model_loss(c, alloc.allocate_uniform(n, r)), 1e-300)
        for r in _uniform_neighbours(spec.bits)
    }
    _add_ratios(stats, "ratio_l_model", model_ratios)
    if spec.compare_uniform:
        uniform = {
            r: output_loss(prep, solve(prep, alloc.allocate_uniform(n, r), spec).q) for r in model_ratios
        }
        _add_ratios(stats, "uniform_loss", uniform)
        _add_ratios(stats, "ratio_l", {r: loss / u if u > 0 else float("nan") for r, u in uniform.items()})
    stats["seconds"] = time.perf_counter() - start
    inv = torch.empty_like(prep.perm)
    inv[prep.perm] = torch.arange(n, device=prep.perm.device)
    inv = inv.cpu()
    group_of_column = None if gs == -1 else _group_of_column(n, gs)[inv]
    return LayerResult(
        q=result.q.cpu()[:, inv],
        codes=result.codes.cpu()[:, inv].long(),
        bits=bits[inv],
        range_min=result.range_min,
        range_max=result.range_max,
        group_of_column=group_of_column,
        stats=stats,
        rotation=prep.rotation,
    )
