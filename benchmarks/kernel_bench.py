"""Benchmark the BaqLinear Triton kernels against fp16 torch.matmul on one CUDA GPU.

    python benchmarks/kernel_bench.py --tune --graph  # sweep configs (writes the tuned table), layer table,
                                                 # 32 layers replayed in a CUDA graph
    python benchmarks/kernel_bench.py                 # layer table only, with the tuned table if one exists
    python benchmarks/kernel_bench.py --dry-run       # CPU: every step on tiny shapes, Triton interpreter

For each Llama-2-7B projection shape and mean code bitwidth it builds a BaqLinear with a BAQ-like
bitwidth histogram and random codes, checks the kernels against the torch reference, then times
(triton.testing.do_bench: median, L2 flushed before every run, as when a model's weights stream
through once per token) at 1, 2, 8 and 16 rows of x:

- BaqLinear's CUDA forward (``baq_hf.kernels.ops.linear``: the GEMV or the tile kernel, one launch),
  with the bytes it reads and the bandwidth as a fraction of the GPU's peak (--peak-tbps, default from
  a table of known GPUs);
- dequantize (W^T, fp16) + matmul, and the dequantizer alone (the prefill path);
- fp16 torch.matmul (F.linear) on the same (dequantized) weight.

``--tune`` first times the pruned config grid (baq_hf.kernels.configs.candidates) per shape and batch
bucket at ``--tune-bits`` and writes the winners to baq_hf/kernels/tuned/<gpu>.json (or --table-dir),
which the forward then uses. ``--graph`` captures the 224 projections of 32 Llama-2-7B blocks (batch
1) in one CUDA graph, for BAQ and for fp16, and reports the replay time and % of peak bandwidth: a
single layer's time has a timer floor of a few microseconds, a stack of layers does not.
Kernels are compiled before timing, in parallel processes (Triton's on-disk cache carries them over).
Results go to docs/results/kernels.md and kernels.json, with the GPU name and the exact command.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from baq_hf import format as fmt
from baq_hf.kernels import configs
from baq_hf.kernels.layout import KernelLayout
from baq_hf.linear import BaqLinear

ROOT = Path(__file__).resolve().parents[1]

# (name, out_features M, in_features N)
LLAMA2_7B_SHAPES = [
    ("llama2-7b q/k/v/o 4096x4096", 4096, 4096),
    ("llama2-7b gate/up 11008x4096", 11008, 4096),
    ("llama2-7b down 4096x11008", 4096, 11008),
]
# the projections of one Llama-2-7B block, in order: (M, N) of q, k, v, o, gate, up, down
LLAMA2_7B_BLOCK = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
TINY_SHAPES = [("tiny 48x80", 48, 80), ("tiny 32x160", 32, 160)]  # --dry-run
DEFAULT_BITS = [2.0, 2.5, 3.0, 4.0]
BATCHES = (1, 2, 8, 16)

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
    packs them with :meth:`baq_hf.format.BaqWeight.pack` instead (the same distribution, but slow on
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
        packed = fmt.BaqWeight.pack(codes, bits, mn, mx, group_of_column)
    else:
        perm = torch.sort(bits, stable=True).indices
        stored = bits[perm]
        n_words = fmt.total_words(fmt.segments_from_bits(stored, m), m)
        words = torch.randint(-(2**31), 2**31, (n_words,), generator=g, dtype=torch.int64)
        tensors = {
            "weight": words.to(torch.int32),
            "bits_header": fmt.pack_header(stored),
            "perm": perm.to(torch.int32),
            "range_min": mn.half(),
            "range_max": mx.half(),
        }
        if group_of_column is not None:
            tensors["group_index"] = group_of_column[perm].to(torch.int32)
        packed = fmt.BaqWeight(m, tensors)
    return BaqLinear.from_packed(packed, None if bias is None else bias.to(dtype)).to(device)


def layout_bytes(layout: KernelLayout) -> int:
    """Bytes a product reads besides x and y: the codes, the column map, the ranges (and groups)."""
    tensors = [layout.codes, layout.colmap, layout.range_min, layout.range_max]
    if layout.group_of is not None:
        tensors.append(layout.group_of)
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------------------------
# timing


def make_timer(device: torch.device, rep_ms: int) -> Callable[[Callable[[], object]], float]:
    """Median microseconds of ``fn``: do_bench with the L2 flushed on CUDA, a plain loop on CPU."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: 1e3 * triton.testing.do_bench(fn, warmup=5, rep=rep_ms, return_mode="median")

    def cpu_time(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e6 * sorted(times)[1]

    return cpu_time


def peak_tbps(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, tbps in PEAK_TBPS:
        if key in name:
            return tbps
    return None


# ----------------------------------------------------------------------------------------------
# correctness (every layer, before timing it)


def check(layer: BaqLinear, layout: KernelLayout, batches=BATCHES) -> None:
    """Abort the benchmark if a kernel disagrees with the torch reference."""
    from baq_hf.kernels import ops
    from baq_hf.kernels import triton_kernels as tk

    w = layer.dequantize()
    if not torch.equal(tk.dequantize(layout, torch.float16), w.half()):
        raise SystemExit("dequantize kernel != torch reference: not benchmarking a wrong kernel")
    for b in batches:
        x = torch.randn(b, layer.in_features, device=w.device, dtype=torch.float16)
        ref = F.linear(x.float(), w, None if layer.bias is None else layer.bias.float())
        mag = F.linear(x.float().abs(), w.abs()) + 1e-3
        err = ((ops.linear(x, layout, layer.bias).float() - ref).abs() / mag).max().item()
        if err > 2e-3:
            raise SystemExit(f"forward off by {err:.3g} (relative to sum |w x|) at {b} rows")


# ----------------------------------------------------------------------------------------------
# compiling before timing: worker processes run each kernel variant once on the real layer


def _compile_jobs(jobs: list[tuple]) -> int:
    """Worker: for (m, n, bits, group_size, seed, rows, kernel, block_n, block_k, warps), launch once."""
    from baq_hf.kernels import triton_kernels as tk

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layers: dict[tuple, KernelLayout] = {}
    for m, n, bits, group_size, seed, rows, kernel, block_n, block_k, warps in jobs:
        key = (m, n, bits, group_size, seed)
        if key not in layers:
            layers[key] = random_baq_linear(
                m, n, bits, group_size=group_size, seed=seed, device=dev
            ).kernel_layout()
        x = torch.randn(rows, n, device=dev, dtype=torch.float16)
        launch = tk.gemv if kernel == "gemv" else tk.tile_matmul
        launch(x, layers[key], None, block_n=block_n, block_k=block_k, num_warps=warps)
    if dev == "cuda":
        torch.cuda.synchronize()
    return len(jobs)


def _variant(j: tuple) -> tuple:
    """What makes a job's compiled kernel distinct: its config, one row or more (the tile kernel's
    BLOCK_B), grouping, the range of bitwidths (which the GEMV compiles code for) and whether M and N
    are multiples of 16 (which the JIT specializes on)."""
    m, n, bits, group_size, seed, rows, kernel, block_n, block_k, warps = j
    widths = baq_bits(n, bits, seed=seed)
    widths = widths[widths > 0]
    shape = (m % 16 == 0, n % 16 == 0, group_size != -1)
    return (kernel, block_n, block_k, warps, rows == 1, *shape, int(widths.min()), int(widths.max()))


def precompile(jobs: list[tuple], workers: int) -> float:
    """Compile each distinct kernel variant of ``jobs`` once, in ``workers`` processes; wall seconds."""
    jobs = list({_variant(j): j for j in sorted(set(jobs))}.values())
    t0 = time.perf_counter()
    if not jobs:
        return 0.0
    workers = max(1, min(workers, len(jobs)))
    chunks = [jobs[i::workers] for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_compile_jobs, chunks)
    print(f"compiled {len(jobs)} kernel variants in {time.perf_counter() - t0:.0f} s", flush=True)
    return time.perf_counter() - t0


def job(m: int, n: int, bits: float, args, rows: int, cfg: configs.KernelConfig) -> tuple:
    return (m, n, bits, args.group_size, args.seed, rows, cfg.kernel, cfg.block_n, cfg.block_k, cfg.num_warps)


# ----------------------------------------------------------------------------------------------
# the config sweep


def sweep_configs(grouped: bool, every: int = 1) -> dict[int, list[configs.KernelConfig]]:
    """Configs to time per batch bucket: at one row the GEMV grid (per-row layers) and the tile grid
    (every ``every``-th of each, the fallbacks always)."""
    gemv = [] if grouped else [*configs.candidates("gemv")[::every], configs.fallback("gemv")]
    tile = [*configs.candidates("tile")[::every], configs.fallback("tile")]
    one = list(dict.fromkeys(gemv + tile))
    return {b: one if b == 1 else list(dict.fromkeys(tile)) for b in configs.BATCH_BUCKETS}


def tune(shapes, args, t_us, dev) -> tuple[dict, list[dict]]:
    """Time every candidate per (shape, bucket) at ``args.tune_bits``; the table entries and all rows."""
    from baq_hf.kernels import triton_kernels as tk

    entries: dict[str, dict] = {}
    rows: list[dict] = []
    for name, m, n in shapes:
        layer = random_baq_linear(
            m, n, args.tune_bits, group_size=args.group_size, seed=args.seed, device=dev
        )
        layout = layer.kernel_layout()
        for bucket, cands in sweep_configs(layout.grouped, args.sweep_every).items():
            x = torch.randn(bucket, n, device=dev, dtype=torch.float16)
            timed = []
            for cfg in cands:
                launch = tk.gemv if cfg.kernel == "gemv" else tk.tile_matmul
                try:
                    us = t_us(lambda f=launch, c=cfg, x=x, lo=layout: f(x, lo, None, **c.launch_args()))
                except Exception as exc:  # e.g. out of shared memory for a large tile: log, go on
                    print(f"  tune {name} b{bucket} {cfg}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                timed.append((us, cfg))
            if not timed:
                continue
            best_us, best = min(timed, key=lambda t: t[0])
            gemv_ok = not layout.grouped and layout.zero_fold_exact
            fb = configs.fallback("gemv" if gemv_ok and bucket == 1 else "tile")
            fb_us = next((us for us, c in timed if c == fb), None)
            key = configs.table_key(m, n, layout.max_bits, bucket, torch.float16, layout.grouped)
            entries[key] = {**configs.config_dict(best), "us": round(best_us, 2), "fallback_us": fb_us}
            rows.append(
                {
                    "shape": name,
                    "bucket": bucket,
                    "best": configs.config_dict(best),
                    "us": best_us,
                    "fallback_us": fb_us,
                    "n_timed": len(timed),
                }
            )
            print(f"tune {name} b{bucket}: {best} {best_us:.1f} us (fallback {fb_us})", flush=True)
    return entries, rows


# ----------------------------------------------------------------------------------------------
# the layer table


def bench_layer(name: str, m: int, n: int, bits: float, args, peak: float | None, t_us, dev) -> dict:
    from baq_hf.kernels import ops
    from baq_hf.kernels import triton_kernels as tk

    layer = random_baq_linear(m, n, bits, group_size=args.group_size, seed=args.seed, device=dev)
    layout = layer.kernel_layout()
    if not args.no_check:
        check(layer, layout)
    w16 = layer.dequantize(torch.float16)
    nb = layout_bytes(layout)
    row: dict = {
        "shape": name,
        "M": m,
        "N": n,
        "group_size": args.group_size,
        "code_bits": layer.code_bits,
        "effective_bits": layer.effective_bits,
        "histogram": histogram(layer.stored_bits),
        "layout_bytes": nb,
        "stored_bytes": layer.storage_bytes(),
        "fp16_weight_bytes": m * n * 2,
    }
    row["dequant_us"] = t_us(lambda: tk.dequantize(layout, torch.float16, transposed=True))
    for b in BATCHES:
        x = torch.randn(b, n, device=dev, dtype=torch.float16)
        io = (b * n + b * m) * 2
        cfg = ops._config(layout, b, torch.float16)
        row[f"config_b{b}"] = configs.config_dict(cfg)
        row[f"baq_b{b}_us"] = t_baq = t_us(lambda x=x: ops.linear(x, layout, None))
        row[f"fp16_b{b}_us"] = t_fp16 = t_us(lambda x=x: F.linear(x, w16))
        row[f"dq_mm_b{b}_us"] = t_us(lambda x=x: x @ tk.dequantize(layout, torch.float16, transposed=True))
        row[f"baq_b{b}_gbps"] = (nb + io) / t_baq / 1e3
        row[f"speedup_b{b}"] = t_fp16 / t_baq
        row[f"ideal_b{b}"] = (m * n * 2 + io) / (nb + io)
        if peak:
            row[f"baq_b{b}_frac_peak"] = row[f"baq_b{b}_gbps"] / (peak * 1e3)
            row[f"fp16_b{b}_frac_peak"] = (m * n * 2 + io) / t_fp16 / 1e3 / (peak * 1e3)
    return row


# ----------------------------------------------------------------------------------------------
# 32 blocks in one CUDA graph


def graph_replay(args, peak: float | None, t_us, dev, n_blocks: int) -> dict:
    """Replay time of the 7 x n_blocks projections (batch 1) captured in one CUDA graph, BAQ and fp16.

    Each block gets its own copy of the 7 layers (distinct memory, so nothing stays in L2 between
    layers); inputs are random and outputs discarded: what is measured is the weight streaming.
    """
    from baq_hf.kernels import ops

    shapes = LLAMA2_7B_BLOCK if dev != "cpu" else [(m, n) for _, m, n in TINY_SHAPES]
    base = [
        random_baq_linear(m, n, args.graph_bits, group_size=args.group_size, seed=args.seed + i, device=dev)
        for i, (m, n) in enumerate(shapes)
    ]
    baq = [copy.deepcopy(lay) for _ in range(n_blocks) for lay in base]
    layouts = [lay.kernel_layout() for lay in baq]
    xs = [torch.randn(1, lay.in_features, device=dev, dtype=torch.float16) for lay in baq]
    dense = [
        torch.randn(lay.out_features, lay.in_features, device=dev, dtype=torch.float16) * 0.02 for lay in baq
    ]

    def run_baq() -> None:
        for layout, x in zip(layouts, xs, strict=True):
            ops.linear(x, layout, None)

    def run_fp16() -> None:
        for w, x in zip(dense, xs, strict=True):
            F.linear(x, w)

    out = {
        "n_layers": len(baq),
        "bits": args.graph_bits,
        "code_bits": sum(lay.code_bits for lay in base) / len(base),
    }
    for tag, fn, nbytes in (
        ("baq", run_baq, sum(layout_bytes(lo) for lo in layouts)),
        ("fp16", run_fp16, sum(w.numel() * 2 for w in dense)),
    ):
        fn()  # compile, build workspaces
        if dev == "cuda":
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            us = t_us(graph.replay)
        else:
            us = t_us(fn)
        out[f"{tag}_us"] = us
        out[f"{tag}_bytes"] = nbytes
        out[f"{tag}_tbps"] = nbytes / us / 1e6
        if peak:
            out[f"{tag}_frac_peak"] = out[f"{tag}_tbps"] / peak
    out["speedup"] = out["fp16_us"] / out["baq_us"]
    return out


# ----------------------------------------------------------------------------------------------
# report

# kernels.md carries the static analysis of benchmarks/kernel_static.py between these markers; a GPU
# run rewrites the rest of the file and keeps that section
STATIC_BEGIN = "<!-- static-analysis:begin (benchmarks/kernel_static.py) -->"
STATIC_END = "<!-- static-analysis:end -->"


def static_section(md_path: Path) -> str:
    """The marked static-analysis section of ``md_path`` (markers included), or ''."""
    text = md_path.read_text() if md_path.exists() else ""
    if STATIC_BEGIN not in text or STATIC_END not in text:
        return ""
    return text[text.index(STATIC_BEGIN) : text.index(STATIC_END) + len(STATIC_END)]


def put_static_section(md_path: Path, body: str) -> None:
    """Replace (or add, after the title) the marked static-analysis section of ``md_path``."""
    section = f"{STATIC_BEGIN}\n{body.strip()}\n{STATIC_END}"
    text = md_path.read_text() if md_path.exists() else "# BaqLinear kernel benchmark\n"
    old = static_section(md_path)
    if old:
        text = text.replace(old, section)
    else:
        title, _, rest = text.partition("\n")
        text = f"{title}\n\n{section}\n{rest}"
    md_path.write_text(text)


def fmt_pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def write_report(results: dict, md_path: Path, json_path: Path) -> None:
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    meta, rows = results["meta"], results["rows"]
    peak = meta["peak_tbps"]
    lines = [
        "# BaqLinear kernel benchmark",
        "",
        f'- GPU: **{meta["gpu"]}**, peak bandwidth used for "% peak": '
        + (f"{peak} TB/s ({meta['peak_source']})" if peak else "unknown (pass --peak-tbps)"),
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, {meta['date']}",
        f"- command: `{meta['command']}`; kernels compiled before timing in "
        f"{meta.get('precompile_s', 0):.0f} s",
        f"- configs: {meta.get('configs', 'n/a')}",
        "- timing: `triton.testing.do_bench`, median, L2 flushed before every run; fp16 activations; "
        f"group_size {meta['group_size']}; per-layer histogram of code bits in kernels.json",
        "- BAQ = BaqLinear's CUDA forward (one kernel launch; GEMV at 1 row, tile kernel with a dot at 2-16);"
        " dq+mm = dequantize W^T (fp16) + matmul; bytes = kernel layout (codes, column map, ranges) + x + y;"
        ' "ideal" = fp16 bytes / BAQ bytes, the speedup a purely bandwidth-bound kernel would get.',
        "- static analysis of the same kernels (16-byte loads, spills, registers): "
        "[kernels_static.md](kernels_static.md)",
        "",
        "## Layers: BAQ forward vs fp16 torch.matmul vs dequantize + matmul",
        "",
        "| layer (out x in) | code bits | eff. bits | rows | BAQ µs | BAQ % peak | fp16 µs | fp16 % peak "
        "| dq+mm µs | speedup vs fp16 | ideal | vs dq+mm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for b in BATCHES:
            lines.append(
                f"| {r['shape']} | {r['code_bits']:.2f} | {r['effective_bits']:.2f} | {b} "
                f"| {r[f'baq_b{b}_us']:.1f} | {fmt_pct(r.get(f'baq_b{b}_frac_peak'))} "
                f"| {r[f'fp16_b{b}_us']:.1f} "
                f"| {fmt_pct(r.get(f'fp16_b{b}_frac_peak'))} | {r[f'dq_mm_b{b}_us']:.1f} "
                f"| {r[f'speedup_b{b}']:.2f}x | {r[f'ideal_b{b}']:.2f}x "
                f"| {r[f'dq_mm_b{b}_us'] / r[f'baq_b{b}_us']:.2f}x |"
            )
    lines += ["", "Dequantizer alone (W^T, fp16): "]
    lines += [f"{r['shape']} at {r['code_bits']:.2f} bits: {r['dequant_us']:.1f} µs; " for r in rows]
    graph = results.get("graph")
    if graph:
        lines += [
            "",
            f"## {graph['n_layers']} projections of Llama-2-7B blocks (batch 1) replayed in one CUDA graph",
            "",
            "| weights | replay µs | bytes read (weights) | TB/s | % peak |",
            "|---|---:|---:|---:|---:|",
        ]
        for tag, label in (("baq", f"BAQ {graph['code_bits']:.2f} code bits"), ("fp16", "fp16")):
            lines.append(
                f"| {label} | {graph[f'{tag}_us']:.0f} | {graph[f'{tag}_bytes'] / 1e9:.2f} GB "
                f"| {graph[f'{tag}_tbps']:.2f} | {fmt_pct(graph.get(f'{tag}_frac_peak'))} |"
            )
        lines.append(f"\nBAQ / fp16 speedup: {graph['speedup']:.2f}x")
    tuned = results.get("tune")
    if tuned:
        lines += ["", "## Config sweep (best per shape and batch bucket, fp16)", ""]
        lines += ["| layer | rows | best config | µs | fallback µs |", "|---|---:|---|---:|---:|"]
        for t in tuned:
            fb = "n/a" if t["fallback_us"] is None else f"{t['fallback_us']:.1f}"
            lines.append(f"| {t['shape']} | {t['bucket']} | {t['best']} | {t['us']:.1f} | {fb} |")
    lines += [
        "",
        "End-to-end generation: see [generate.md](generate.md) (`python benchmarks/generate.py`).",
        "",
    ]
    md_path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", nargs="+", type=float, default=DEFAULT_BITS, help="mean code bits")
    p.add_argument("--group-size", type=int, default=-1)
    p.add_argument("--peak-tbps", type=float, default=None, help="peak DRAM bandwidth, TB/s")
    p.add_argument("--rep-ms", type=int, default=50, help="do_bench time budget per measurement")
    p.add_argument("--tune", action="store_true", help="sweep the config grid first, write the tuned table")
    p.add_argument("--tune-bits", type=float, default=3.0)
    p.add_argument("--sweep-every", type=int, default=1, help="time every n-th config of the grid")
    p.add_argument("--table-dir", type=Path, default=configs.TUNED_DIR, help="where --tune writes <gpu>.json")
    p.add_argument("--graph", action="store_true", help="32 blocks of projections in one CUDA graph")
    p.add_argument("--graph-bits", type=float, default=3.0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes compiling kernels")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-md", type=Path, default=ROOT / "docs/results/kernels.md")
    p.add_argument("--out-json", type=Path, default=ROOT / "docs/results/kernels.json")
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes under the Triton interpreter")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--dry-run runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        dev, shapes, n_blocks = "cpu", TINY_SHAPES, 2
        args.bits, args.workers, args.sweep_every = args.bits[:1], min(args.workers, 2), 12
    elif not torch.cuda.is_available():
        sys.exit(
            "benchmarks/kernel_bench.py needs a CUDA GPU, and torch.cuda.is_available() is False "
            f"(torch {torch.__version__}). Run it on a GPU machine: `python benchmarks/kernel_bench.py`; "
            "`--dry-run` (with TRITON_INTERPRET=1) runs every step on tiny shapes on CPU."
        )
    else:
        dev, shapes, n_blocks = "cuda", LLAMA2_7B_SHAPES, 32
    import triton

    gpu = (
        torch.cuda.get_device_name()
        if dev == "cuda"
        else f"none (dry run on {platform.processor() or 'CPU'})"
    )
    peak = peak_tbps(gpu, args.peak_tbps)
    t_us = make_timer(torch.device(dev), args.rep_ms)
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
    results: dict = {"meta": meta}
    precompile_s = 0.0
    grouped = args.group_size != -1
    if args.tune:
        jobs = [
            job(m, n, args.tune_bits, args, b, c)
            for _, m, n in shapes
            for b, cands in sweep_configs(grouped, args.sweep_every).items()
            for c in cands
        ]
        precompile_s += precompile(jobs, args.workers)
        entries, results["tune"] = tune(shapes, args, t_us, dev)
        out = args.table_dir / f"{configs.gpu_slug(gpu)}.json"
        configs.write_table(out, gpu, meta["command"], entries)
        os.environ[configs.CONFIGS_ENV] = str(out)  # the layer table below uses what was just measured
        meta["tuned_table"] = str(out)
        print(f"wrote {out}", flush=True)
        write_report({**results, "rows": []}, args.out_md, args.out_json)  # kept if a later step is cut short
    table = configs.table_path(torch.device(dev))
    meta["configs"] = f"tuned table {table.name}" if table else "fallback (no tuned table for this GPU)"
    jobs = []
    for _, m, n in shapes:
        for bits in args.bits:
            max_bits = int(
                baq_bits(n, bits, seed=args.seed).max()
            )  # the layer's, as random_baq_linear draws it
            for b in BATCHES:
                cfg = configs.choose(
                    torch.device(dev), m, n, max_bits, b, torch.float16, grouped, not grouped
                )
                jobs.append(job(m, n, bits, args, b, cfg))
    precompile_s += precompile(jobs, args.workers)
    meta["precompile_s"] = precompile_s
    rows = []
    for name, m, n in shapes:
        for bits in args.bits:
            row = bench_layer(name, m, n, bits, args, peak, t_us, dev)
            rows.append(row)
            print(
                f"{name:32s} {row['code_bits']:.2f} bits: B=1 {row['baq_b1_us']:7.1f} µs "
                f"({fmt_pct(row.get('baq_b1_frac_peak'))} peak) fp16 {row['fp16_b1_us']:7.1f} µs "
                f"speedup {row['speedup_b1']:.2f}x (ideal {row['ideal_b1']:.2f}x); "
                f"B=8 {row['speedup_b8']:.2f}x fp16, {row['dq_mm_b8_us'] / row['baq_b8_us']:.2f}x dq+mm",
                flush=True,
            )
            if dev == "cuda":
                torch.cuda.empty_cache()
            write_report({**results, "rows": rows}, args.out_md, args.out_json)
    results["rows"] = rows
    if args.graph:
        results["graph"] = graph_replay(args, peak, t_us, dev, n_blocks)
        g = results["graph"]
        print(
            f"graph of {g['n_layers']} layers: BAQ {g['baq_us']:.0f} µs ({fmt_pct(g.get('baq_frac_peak'))} "
            f"peak), fp16 {g['fp16_us']:.0f} µs, speedup {g['speedup']:.2f}x",
            flush=True,
        )
    write_report(results, args.out_md, args.out_json)
    print(f"wrote {args.out_md} and {args.out_json}")
    return results


if __name__ == "__main__":
    main()
