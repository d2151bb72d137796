"""Benchmark the BaqLinear Triton kernels against fp16 torch.matmul on one CUDA GPU.

    python benchmarks/kernel_bench.py                 # all shapes, code bits 2, 2.5, 3, 4
    python benchmarks/kernel_bench.py --tune          # also sweep the fused kernel's block sizes
    python benchmarks/kernel_bench.py --dry-run       # CPU: build the layers and print their sizes only

For each layer shape (Llama-2-7B and SmolLM2-135M projections) and mean code bitwidth it builds a
BaqLinear with a BAQ-like bitwidth histogram and random codes, checks the kernels against the torch
reference, then times (triton.testing.do_bench: median, L2 flushed before every run, as when a whole
model's weights stream through once per token):

- the fused mixed-bit GEMV at batch 1 and 8, with the bytes it must read and the achieved bandwidth
  as a fraction of the GPU's peak (--peak-tbps, default from a table of known GPUs);
- dequantize + matmul at batch 8 (the prefill path) and the dequantizer alone;
- fp16 torch.matmul (F.linear) at batch 1 and 8 on the same (dequantized) weight.

Results go to docs/results/kernels.md and kernels.json, with the GPU name and the exact command.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from baq_hf import format as fmt
from baq_hf.format import PackedWeight, pack_weight
from baq_hf.linear import BaqLinear

ROOT = Path(__file__).resolve().parents[1]

# (name, out_features M, in_features N)
LLAMA2_7B_SHAPES = [
    ("llama2-7b q/k/v/o 4096x4096", 4096, 4096),
    ("llama2-7b gate/up 11008x4096", 11008, 4096),
    ("llama2-7b down 4096x11008", 4096, 11008),
]
SMOLLM2_135M_SHAPES = [
    ("smollm2-135m q/o 576x576", 576, 576),
    ("smollm2-135m k/v 192x576", 192, 576),
    ("smollm2-135m gate/up 1536x576", 1536, 576),
    ("smollm2-135m down 576x1536", 576, 1536),
]
SHAPES = {"llama": LLAMA2_7B_SHAPES, "smollm": SMOLLM2_135M_SHAPES}
DEFAULT_BITS = [2.0, 2.5, 3.0, 4.0]

# Peak DRAM bandwidth (TB/s) by a substring of torch.cuda.get_device_name(), most specific first.
PEAK_TBPS = [
    ("H200", 4.8),
    ("H100 PCIe", 2.0),
    ("H100 NVL", 3.9),
    ("H100", 3.35),  # SXM5 80GB HBM3
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIe", 1.935),
    ("A100", 1.555),  # 40GB
    ("L40S", 0.864),
    ("RTX 4090", 1.008),
]


# ----------------------------------------------------------------------------------------------
# BAQ-like layers (shared with benchmarks/generate.py)


def baq_bits(n: int, mean_bits: float, seed: int = 0, max_bits: int = 8, spread: float = 0.8) -> torch.Tensor:
    """Per-column bitwidths (int64, n) with mean exactly round(mean_bits * n) / n, shaped like BAQ's.

    BAQ gives most columns R - 1, R or R + 1 bits around the mean, drops a few insensitive columns to 0
    bits and gives a few very sensitive ones several extra bits. Here: a rounded normal around the mean
    (sd ``spread``) in [1, max_bits], 3% of the columns at 0 bits, 2% at mean + 3, then single-bit
    moves of ordinary columns until the total matches.
    """
    g = torch.Generator().manual_seed(seed)
    bits = torch.round(mean_bits + spread * torch.randn(n, generator=g)).clamp(1, max_bits).long()
    order = torch.randperm(n, generator=g)
    n_zero, n_high = round(0.03 * n), round(0.02 * n)
    bits[order[:n_zero]] = 0
    bits[order[n_zero : n_zero + n_high]] = min(max_bits, round(mean_bits) + 3)
    ordinary = torch.zeros(n, dtype=torch.bool)
    ordinary[order[n_zero + n_high :]] = True
    target = round(mean_bits * n)
    for _ in range(100):
        diff = target - int(bits.sum())
        if diff == 0:
            break
        movable = ordinary & ((bits < max_bits) if diff > 0 else (bits > 1))
        if not bool(movable.any()):  # only the special columns are left to move
            movable = (bits < max_bits) if diff > 0 else (bits > 0)
        idx = movable.nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)[: abs(diff)]]
        bits[idx] += 1 if diff > 0 else -1
    return bits


def histogram(bits: torch.Tensor) -> dict[int, float]:
    """Fraction of columns per bitwidth."""
    counts = torch.bincount(bits, minlength=int(bits.max()) + 1)
    return {b: round(c / bits.numel(), 4) for b, c in enumerate(counts.tolist()) if c}


def random_baq_linear(
    m: int,
    n: int,
    mean_bits: float,
    *,
    group_size: int = -1,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    seed: int = 0,
    exact_pack: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
) -> BaqLinear:
    """A BaqLinear (M x N) with :func:`baq_bits` bitwidths and uniformly random codes.

    Ranges are fitted to ``weight`` when given (so outputs have the model's scale), else random.
    By default the packed stream is drawn as random int32 words, which is exactly a stream of
    independent uniform codes of every width (pad bits are never read); ``exact_pack`` draws codes and
    packs them with :func:`baq_hf.format.pack_weight` instead (the same distribution, but slow on
    CPU for large layers: about 10 s for 11008 x 4096).
    """
    g = torch.Generator().manual_seed(seed)
    bits = baq_bits(n, mean_bits, seed=seed)
    n_groups = 1 if group_size == -1 else n // group_size
    if weight is not None:
        w = weight.detach().float()
        mn, mx = fmt.fit_range(w.reshape(m * n_groups, n // n_groups), sym=False)
        mn, mx = mn.view(m, n_groups).cpu(), mx.view(m, n_groups).cpu()
    else:
        mx = (0.02 + 0.06 * torch.rand(m, n_groups, generator=g)).half()
        mn = (-0.02 - 0.06 * torch.rand(m, n_groups, generator=g)).half()
    group_of_column = None if group_size == -1 else torch.arange(n) // group_size
    if exact_pack:
        codes = (torch.rand(m, n, generator=g) * (1 << bits).double()).long()
        packed = pack_weight(codes, bits, mn, mx, group_of_column)
    else:
        perm = torch.sort(bits, stable=True).indices
        stored = bits[perm]
        n_words = fmt.total_words(fmt.segments_from_bits(stored, m), m)
        packed = PackedWeight(
            shape=(m, n),
            qweight=torch.randint(-(2**31), 2**31, (n_words,), generator=g, dtype=torch.int64).to(
                torch.int32
            ),
            bits_header=fmt.pack_header(stored),
            perm=perm.to(torch.int32),
            range_min=mn.half(),
            range_max=mx.half(),
            group_index=None if group_of_column is None else group_of_column[perm].to(torch.int32),
        )
    return BaqLinear.from_packed(packed, None if bias is None else bias.to(dtype)).to(device)


def layer_bytes(layer: BaqLinear) -> dict[str, int]:
    """Bytes of the tensors a fused GEMV reads besides x: codes and the per-row/group metadata."""
    meta = layer.range_min.numel() * 2 + layer.range_max.numel() * 2 + layer.perm.numel() * 4
    if layer.group_index is not None:
        meta += layer.group_index.numel() * 4
    if layer.bias is not None:
        meta += layer.bias.numel() * layer.bias.element_size()
    return {"codes": layer.qweight.numel() * 4, "meta": meta}


# ----------------------------------------------------------------------------------------------
# benchmark


def peak_tbps(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, tbps in PEAK_TBPS:
        if key in name:
            return tbps
    return None


def check(layer: BaqLinear, x: torch.Tensor, tk) -> None:
    """Abort the benchmark if a kernel disagrees with the torch reference."""
    w = layer.dequantize()
    if not torch.equal(tk.dequantize(layer, torch.float16), w.half()):
        raise SystemExit("dequantize kernel != torch reference: not benchmarking a wrong kernel")
    ref = F.linear(x.float(), w, None if layer.bias is None else layer.bias.float())
    mag = F.linear(x.float().abs(), w.abs()) + 1e-3
    err = ((tk.fused_linear(x, layer).float() - ref).abs() / mag).max().item()
    if err > 2e-3:
        raise SystemExit(f"fused kernel off by {err:.3g} (relative to sum |w x|)")


def bench_one(
    name: str, m: int, n: int, mean_bits: float, args, peak: float | None, tk, dev: str = "cuda"
) -> dict:
    import triton.testing

    def t_us(fn) -> float:
        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=args.rep_ms, return_mode="median")

    layer = random_baq_linear(m, n, mean_bits, group_size=args.group_size, seed=args.seed, device=dev)
    w16 = layer.dequantize(torch.float16)
    xs = {b: torch.randn(b, n, device=dev, dtype=torch.float16) for b in (1, 8)}
    if not args.no_check:
        for x in xs.values():
            check(layer, x, tk)
    nb = layer_bytes(layer)
    row: dict = {
        "shape": name,
        "M": m,
        "N": n,
        "group_size": args.group_size,
        "code_bits": layer.code_bits,
        "effective_bits": layer.effective_bits,
        "histogram": histogram(layer.stored_bits),
        "codes_bytes": nb["codes"],
        "meta_bytes": nb["meta"],
        "fp16_weight_bytes": m * n * 2,
    }
    for b, x in xs.items():
        io = (b * n + b * m) * 2
        fused_bytes = nb["codes"] + nb["meta"] + io
        fp16_bytes = m * n * 2 + io
        t_fused = t_us(lambda x=x: tk.fused_linear(x, layer))
        t_fp16 = t_us(lambda x=x: F.linear(x, w16))
        row[f"fused_b{b}_us"] = t_fused
        row[f"fused_b{b}_bytes"] = fused_bytes
        row[f"fused_b{b}_gbps"] = fused_bytes / t_fused / 1e3
        row[f"fp16_b{b}_us"] = t_fp16
        row[f"fp16_b{b}_gbps"] = fp16_bytes / t_fp16 / 1e3
        row[f"speedup_b{b}"] = t_fp16 / t_fused
        row[f"byte_ratio_b{b}"] = fp16_bytes / fused_bytes
        if peak:
            row[f"fused_b{b}_frac_peak"] = row[f"fused_b{b}_gbps"] / (peak * 1e3)
            row[f"fp16_b{b}_frac_peak"] = row[f"fp16_b{b}_gbps"] / (peak * 1e3)
    # batch 1 has two kernels: the default word-level ("chunked") one and the per-code one
    row["per_code_b1_us"] = t_us(lambda: tk.fused_linear(xs[1], layer, impl="per_code"))
    x8 = xs[8]
    perm = layer.perm
    row["dequant_us"] = t_us(lambda: tk.dequantize(layer, torch.float16, stored_order=True))
    row["dequant_matmul_b8_us"] = t_us(
        lambda: F.linear(x8.index_select(1, perm), tk.dequantize(layer, torch.float16, stored_order=True))
    )
    if args.tune:
        row["tune"] = tune(layer, xs, t_us, tk)
    return row


def tune(layer: BaqLinear, xs: dict[int, torch.Tensor], t_us, tk) -> dict:
    """Best fused-kernel configuration of a small sweep, per batch; informs the defaults."""
    configs = {
        1: [
            dict(impl="chunked", block_m=bm, block_k=bk, num_warps=nw)
            for bm in (8, 16, 32)
            for bk in (128, 256, 512)
            for nw in (2, 4, 8)
        ]
        + [dict(impl="per_code", block_m=bm, block_k=bk, num_warps=4) for bm in (16, 32) for bk in (64, 128)],
        8: [
            dict(impl="per_code", block_m=bm, block_k=bk, num_warps=nw)
            for bm in (16, 32, 64)
            for bk in (32, 64, 128)
            for nw in (4, 8)
        ],
    }
    out = {}
    for b, x in xs.items():
        best = None
        for cfg in configs[b]:
            for split in (None, 1, 2, 4, 8):
                try:
                    t = t_us(lambda cfg=cfg, split=split, x=x: tk.fused_linear(x, layer, split=split, **cfg))
                except Exception as exc:  # e.g. out of registers or shared memory for a large tile
                    print(f"  tune b={b} {cfg} split={split}: {type(exc).__name__}: {exc}")
                    continue
                if best is None or t < best["us"]:
                    best = {"us": t, **cfg, "split": split}
        out[f"b{b}"] = best
    return out


# ----------------------------------------------------------------------------------------------
# report


def fmt_pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def write_report(rows: list[dict], meta: dict, md_path: Path, json_path: Path) -> None:
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    peak = meta["peak_tbps"]
    lines = [
        "# BaqLinear kernel benchmark",
        "",
        f'- GPU: **{meta["gpu"]}**, peak bandwidth used for "% peak": '
        + (f"{peak} TB/s ({meta['peak_source']})" if peak else "unknown (pass --peak-tbps)"),
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, {meta['date']}",
        f"- command: `{meta['command']}`",
        "- timing: `triton.testing.do_bench`, median, L2 flushed before every run; fp16 activations; "
        f"group_size {meta['group_size']}; per-layer histogram of code bits in kernels.json",
        "- fused = `fused_linear` defaults: the word-level (chunked) kernel at B = 1, the per-code kernel "
        "with a tensor-core dot at B = 8; the last column times the per-code kernel at B = 1 too.",
        "- bytes = packed codes + ranges/perm(/group index) + x + y for the fused kernel; "
        'fp16 weight + x + y for torch.matmul. "ideal" = fp16 bytes / fused bytes, '
        "the speedup a purely bandwidth-bound kernel would get.",
        "",
        "## Decode: fused GEMV vs fp16 torch.matmul",
        "",
        "| layer (out x in) | code bits | eff. bits | B | fused µs | fused GB/s | fused % peak "
        "| fp16 µs | fp16 % peak | speedup | ideal | per-code kernel µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for b in (1, 8):
            lines.append(
                f"| {r['shape']} | {r['code_bits']:.2f} | {r['effective_bits']:.2f} | {b} "
                f"| {r[f'fused_b{b}_us']:.1f} | {r[f'fused_b{b}_gbps']:.0f} "
                f"| {fmt_pct(r.get(f'fused_b{b}_frac_peak'))} | {r[f'fp16_b{b}_us']:.1f} "
                f"| {fmt_pct(r.get(f'fp16_b{b}_frac_peak'))} | {r[f'speedup_b{b}']:.2f}x "
                f"| {r[f'byte_ratio_b{b}']:.2f}x "
                f"| {r['per_code_b1_us'] if b == 1 else r[f'fused_b{b}_us']:.1f} |"
            )
    lines += [
        "",
        "## Prefill path: dequantize (fp16, storage order) + matmul, batch 8",
        "",
        "| layer (out x in) | code bits | dequant µs | dequant + matmul µs | fused B=8 µs | fp16 B=8 µs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['code_bits']:.2f} | {r['dequant_us']:.1f} "
            f"| {r['dequant_matmul_b8_us']:.1f} | {r['fused_b8_us']:.1f} | {r['fp16_b8_us']:.1f} |"
        )
    if any("tune" in r for r in rows):
        lines += ["", "## Block-size sweep (best per layer)", "", "| layer | code bits | B | µs | config |"]
        lines.append("|---|---:|---:|---:|---|")
        for r in rows:
            for key, best in r.get("tune", {}).items():
                if best:
                    cfg = {k: v for k, v in best.items() if k != "us"}
                    lines.append(
                        f"| {r['shape']} | {r['code_bits']:.2f} | {key[1:]} | {best['us']:.1f} | {cfg} |"
                    )
    lines += [
        "",
        "End-to-end generation: see [generate.md](generate.md) (`python benchmarks/generate.py`).",
        "",
    ]
    md_path.write_text("\n".join(lines))


def dry_run(args, shapes) -> None:
    """CPU: build every layer and print its histogram and byte counts; check packing on a small one."""
    small = random_baq_linear(64, 200, 3.0, seed=1, exact_pack=True)
    fast = random_baq_linear(64, 200, 3.0, seed=1)
    assert torch.equal(small.stored_bits, fast.stored_bits) and torch.equal(small.perm, fast.perm)
    assert small.qweight.numel() == fast.qweight.numel()
    print("packing: random words and pack_weight agree on layout")
    for name, m, n in shapes:
        for bits in args.bits:
            layer = random_baq_linear(m, n, bits, group_size=args.group_size, seed=args.seed)
            nb = layer_bytes(layer)
            print(
                f"{name:32s} bits {bits:4.2f}: code {layer.code_bits:.3f} eff {layer.effective_bits:.3f} "
                f"codes {nb['codes'] / 1e6:7.3f} MB meta {nb['meta'] / 1e3:7.1f} kB "
                f"fp16/fused bytes (B=1) {m * n * 2 / (nb['codes'] + nb['meta'] + 2 * (m + n)):.2f}x "
                f"hist {histogram(layer.stored_bits)}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    p.add_argument("--bits", nargs="+", type=float, default=DEFAULT_BITS, help="mean code bits")
    p.add_argument("--group-size", type=int, default=-1)
    p.add_argument("--peak-tbps", type=float, default=None, help="peak DRAM bandwidth, TB/s")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench time budget per measurement")
    p.add_argument("--tune", action="store_true", help="sweep the fused kernel's block sizes")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-md", type=Path, default=ROOT / "docs/results/kernels.md")
    p.add_argument("--out-json", type=Path, default=ROOT / "docs/results/kernels.json")
    p.add_argument("--dry-run", action="store_true", help="CPU only: build layers, print sizes, time nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shapes = [s for key in ("llama", "smollm") if key in args.shapes for s in SHAPES[key]]
    if args.dry_run:
        dry_run(args, shapes)
        return
    if not torch.cuda.is_available():
        sys.exit(
            "benchmarks/kernel_bench.py needs a CUDA GPU, and torch.cuda.is_available() is False "
            f"(torch {torch.__version__}). Run it on a GPU machine: `python benchmarks/kernel_bench.py`; "
            "`--dry-run` checks the layer construction on CPU."
        )
    import triton

    from baq_hf.kernels import triton_kernels as tk

    gpu = torch.cuda.get_device_name()
    peak = peak_tbps(gpu, args.peak_tbps)
    if peak is None:
        print(f"unknown peak bandwidth for {gpu!r}: pass --peak-tbps to get '% peak'", file=sys.stderr)
    meta = {
        "gpu": gpu,
        "peak_tbps": peak,
        "peak_source": "--peak-tbps" if args.peak_tbps is not None else "table by device name",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]]),
        "group_size": args.group_size,
    }
    rows = []
    for name, m, n in shapes:
        for bits in args.bits:
            row = bench_one(name, m, n, bits, args, peak, tk)
            rows.append(row)
            print(
                f"{name:32s} {row['code_bits']:.2f} bits: fused B=1 {row['fused_b1_us']:7.1f} µs "
                f"({fmt_pct(row.get('fused_b1_frac_peak'))} peak) fp16 {row['fp16_b1_us']:7.1f} µs "
                f"speedup {row['speedup_b1']:.2f}x (ideal {row['byte_ratio_b1']:.2f}x)",
                flush=True,
            )
            torch.cuda.empty_cache()
    write_report(rows, meta, args.out_md, args.out_json)
    print(f"wrote {args.out_md} and {args.out_json}")


if __name__ == "__main__":
    main()
