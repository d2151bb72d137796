"""GPTQ with a per-column bitwidth (the solver BAQ plugs its allocation into).

Faithful to the reference GPTQ: Hessian damping by a fraction of mean(diag H), dead inputs zeroed,
optional act_order, the upper Cholesky factor U of H^-1, lazy block updates, group ranges fitted on
the weights as updated when the group starts. The only change is that column j is rounded onto a grid
of 2^R_j levels of its row's (or group's) range, with R_j = 0 meaning "set to 0 and compensate".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from . import allocation as alloc
from . import format as fmt
from .config import BaqConfig

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


@dataclass
class SolveResult:
    """GPTQ's output in quantization order."""

    q: torch.Tensor  # dequantized weight
    codes: torch.Tensor
    column_loss: torch.Tensor  # sum_i (w_ij - q_ij)^2 / d_j^2 (GPTQ's loss, without its 1/2)
    range_min: torch.Tensor  # fp16, M x G
    range_max: torch.Tensor


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


def prepare(
    w: torch.Tensor, h: torch.Tensor, damp_percent: float, act_order: bool, name: str = ""
) -> PreparedLayer:
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(
            f"weights of layer {name!r} contain NaN or inf; fix the checkpoint before quantizing"
        )
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
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
    return PreparedLayer(w=w, h=h_undamped, u=u, perm=perm, dead=dead)


def _group_ranges(w: torch.Tensor, group_size: int, sym: bool):
    """fp16 ranges per row (G = 1) or per row and group, from the given weights."""
    n = w.shape[1]
    if group_size == -1:
        mn, mx = fmt.fit_range(w, sym)
        return mn.unsqueeze(1), mx.unsqueeze(1)
    pairs = [fmt.fit_range(w[:, g : g + group_size], sym) for g in range(0, n, group_size)]
    return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)


def sensitivities(prep: PreparedLayer, group_size: int, sym: bool) -> torch.Tensor:
    """C_j (quantization order) from the initial ranges and d_j = U[j, j]."""
    mn, mx = _group_ranges(prep.w, group_size, sym)
    range_sq = (mx.float() - mn.float()) ** 2  # M x G
    per_group = range_sq.sum(dim=0)  # G
    n = prep.w.shape[1]
    gidx = torch.zeros(n, dtype=torch.long) if group_size == -1 else torch.arange(n) // group_size
    return alloc.sensitivities(per_group.cpu()[gidx], torch.diag(prep.u).cpu(), prep.dead.cpu())


def solve(
    prep: PreparedLayer, bits: torch.Tensor, group_size: int, sym: bool, block_size: int
) -> SolveResult:
    """Run GPTQ over the columns (in quantization order) with bitwidth bits[j] for column j."""
    w = prep.w.clone()
    u = prep.u
    n = w.shape[1]
    device = w.device
    bits_list = bits.tolist()
    bit_values = torch.arange(fmt.MAX_BITS + 1, device=device)
    q_all = torch.zeros_like(w)
    codes_all = torch.zeros_like(w)
    losses = torch.zeros(n, device=device)
    if group_size == -1:
        range_min, range_max = _group_ranges(w, -1, sym)
        scale_tab, zero_tab = fmt.grid(range_min, range_max, bit_values.unsqueeze(0))  # M x 16
        mins, maxs = [range_min], [range_max]
    else:
        mins, maxs = [], []
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size != -1 and col % group_size == 0:
                g_min, g_max = _group_ranges(w[:, col : col + group_size], -1, sym)
                mins.append(g_min)
                maxs.append(g_max)
                scale_tab, zero_tab = fmt.grid(g_min, g_max, bit_values.unsqueeze(0))
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
        range_min=torch.cat(mins, 1).cpu(),
        range_max=torch.cat(maxs, 1).cpu(),
    )


def output_loss(prep: PreparedLayer, q: torch.Tensor) -> float:
    """The layer's calibration loss tr(E H E^T), E = W - Q (proportional to the output MSE)."""
    e = prep.w - q
    return float(((e @ prep.h) * e).sum())


def quantize_weight(w: torch.Tensor, h: torch.Tensor, config: BaqConfig, name: str = "") -> LayerResult:
    """Quantize one weight (out x in) given its Hessian, allocating bits as the config says."""
    start = time.perf_counter()
    prep = prepare(w, h, config.damp_percent, config.act_order, name)
    n = prep.w.shape[1]
    gs = config.group_size
    if gs != -1 and n % gs:
        raise ValueError(
            f"group_size={gs} does not divide in_features={n} of layer {name!r}; "
            "choose a divisor or list the layer in modules_to_not_convert"
        )
    c = sensitivities(prep, gs, config.sym)
    uniform_bits = max(1, round(config.bits))
    uniform = None
    if config.allocation == "measured" or config.compare_uniform:
        uniform = solve(prep, alloc.allocate_uniform(n, uniform_bits), gs, config.sym, config.block_size)
    if config.allocation == "measured":
        c_alloc = torch.where(prep.dead.cpu(), torch.zeros_like(uniform.column_loss), uniform.column_loss)
        c_alloc = c_alloc.double() * 4.0**uniform_bits
    else:
        c_alloc = c
    bits = alloc.allocate(config.allocation, c_alloc, config.bits, config.min_bits, config.max_bits)
    result = solve(prep, bits, gs, config.sym, config.block_size)
    loss = output_loss(prep, result.q)
    stats = {
        "code_bits": float(bits.double().mean()),
        "bit_histogram": torch.bincount(bits, minlength=config.max_bits + 1).tolist(),
        "ratio_c": alloc.ratio_c(c),
        "ratio_l_model": alloc.model_loss(c, bits)
        / max(alloc.model_loss(c, alloc.allocate_uniform(n, uniform_bits)), 1e-300),
        "loss": loss,
        "seconds": time.perf_counter() - start,
    }
    if uniform is not None:
        uniform_loss = output_loss(prep, uniform.q)
        stats["uniform_loss"] = uniform_loss
        stats["ratio_l"] = loss / uniform_loss if uniform_loss > 0 else float("nan")
    inv = torch.empty_like(prep.perm)
    inv[prep.perm] = torch.arange(n, device=prep.perm.device)
    inv = inv.cpu()
    group_of_column = None if gs == -1 else (torch.arange(n) // gs)[inv]
    return LayerResult(
        q=result.q.cpu()[:, inv],
        codes=result.codes.cpu()[:, inv].long(),
        bits=bits[inv],
        range_min=result.range_min,
        range_max=result.range_max,
        group_of_column=group_of_column,
        stats=stats,
    )
