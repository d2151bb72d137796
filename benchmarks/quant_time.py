"""Quantization time of BAQ vs uniform GPTQ on SmolLM2-135M, measured side by side in one process.

The allocations are run interleaved (uniform, baq, measured, uniform, baq, measured, ...) on copies of
the same model with the same calibration windows, and each ratio is taken within one round, so slow
drifts of the machine cancel; run it on an otherwise idle machine all the same (a concurrent job on 2
cores slowed single runs 6x). Per run it
records the wall time of the whole layer-by-layer quantization (block forwards, Hessians, solver,
packing) and the solver's own time (the sum of the per-layer `seconds` in the report). BAQ's extra
work is the sensitivity computation and the allocation; "measured" solves every layer twice.

    python benchmarks/quant_time.py                             # 3 bits per row, 2 bits group 64
    python benchmarks/quant_time.py --num-samples 2 --repeats 3 # docs/results/quant_time.md: short
                                                                # calibration, so the solver dominates

Results: docs/results/quant_time.json and quant_time.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from shared_data import c4_calibration_text  # benchmarks/shared_data.py, beside this script
from transformers import AutoModelForCausalLM, AutoTokenizer

from baq_hf import BaqConfig
from baq_hf.calibration import quantize_model
from baq_hf.data import calibration_windows
from baq_hf.models import smollm2_path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
SETTINGS = {"3 bits, per row": dict(bits=3), "2 bits, group 64": dict(bits=2, group_size=64)}
# name -> BaqConfig fields; every ratio is taken against "uniform" and against "baq" of the same round
VARIANTS: dict[str, dict] = {
    "uniform": dict(allocation="uniform"),
    "baq": dict(allocation="baq"),
    "measured": dict(allocation="measured"),
    "grid": dict(allocation="grid"),
    "baq + clip_search": dict(allocation="baq", clip_search=True),
    "grid + clip_search": dict(allocation="grid", clip_search=True),
}


def time_one(base, windows, config: BaqConfig) -> dict[str, float]:
    model = copy.deepcopy(base)
    start = time.perf_counter()
    report = quantize_model(model, windows, config, progress=False)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "solver_s": sum(s["seconds"] for s in report["layers"].values())}


def write_markdown(rows: list[dict], meta: dict, path: Path) -> None:
    lines = [
        "# Quantization time: BAQ vs uniform GPTQ (SmolLM2-135M)",
        "",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`.",
        f"Protocol: {meta['protocol']}. Runs interleaved; times are medians of {meta['repeats']} runs, "
        "ratios are medians of the ratios within each round.",
        "",
        "| setting | variant | wall s (median) | solver s (median) | wall / uniform | solver / uniform | "
        "wall / baq |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['variant']} | {r['wall_s']:.1f} | {r['solver_s']:.1f} | "
            f"{r['wall_ratio']:.3f}x | {r['solver_ratio']:.3f}x | {r['wall_ratio_baq']:.3f}x |"
        )
    lines += ["", f"Peak resident memory of the process: {meta['peak_rss_mib']:.0f} MiB.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="uniform and baq always run",
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = calibration_windows(c4_calibration_text(), tokenizer, args.num_samples, args.seqlen, 0)
    times: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for setting, fields in ((s, SETTINGS[s]) for s in args.settings):
            for variant, extra in VARIANTS.items():
                if variant not in ("uniform", "baq", *args.variants):
                    continue
                config = BaqConfig(num_samples=args.num_samples, seqlen=args.seqlen, **fields, **extra)
                run = time_one(base, windows, config)
                times.setdefault((setting, variant), []).append(run)
                print(setting, variant, json.dumps(run), flush=True)
    rows = []
    for (setting, variant), runs in times.items():
        ref = times[(setting, "uniform")]
        baq = times[(setting, "baq")]
        # ratios within each repeat (runs close in time), then the median over repeats
        rows.append(
            {
                "setting": setting,
                "variant": variant,
                "wall_ratio_baq": statistics.median(
                    r["wall_s"] / b["wall_s"] for r, b in zip(runs, baq, strict=True)
                ),
                "wall_s": statistics.median(r["wall_s"] for r in runs),
                "solver_s": statistics.median(r["solver_s"] for r in runs),
                "wall_ratio": statistics.median(
                    r["wall_s"] / u["wall_s"] for r, u in zip(runs, ref, strict=True)
                ),
                "solver_ratio": statistics.median(
                    r["solver_s"] / u["solver_s"] for r, u in zip(runs, ref, strict=True)
                ),
                "runs": runs,
            }
        )
    meta = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": f"python benchmarks/quant_time.py --num-samples {args.num_samples} --seqlen {args.seqlen} "
        f"--repeats {args.repeats} --threads {args.threads} --variants {' '.join(args.variants)} "
        f"--settings {' '.join(repr(s) for s in args.settings)}",
        "protocol": f"{args.num_samples} C4 calibration windows of {args.seqlen} tokens, fp32 on CPU",
        "repeats": args.repeats,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quant_time.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_markdown(rows, meta, RESULTS / "quant_time.md")
    print((RESULTS / "quant_time.md").read_text())


if __name__ == "__main__":
    main()
