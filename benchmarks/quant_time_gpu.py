"""BAQ quantization time and memory on one GPU, per Llama-2-7B-shaped decoder block (random weights).

    python benchmarks/quant_time_gpu.py                     # 2 blocks, 3 bits, 128 x 2048 calibration
    python benchmarks/quant_time_gpu.py --num-samples 32 --seqlen 2048
    python benchmarks/quant_time_gpu.py --dry-run           # CPU: a tiny Llama, the same steps

A LlamaForCausalLM with Llama-2-7B's dimensions and ``--blocks`` decoder blocks is built on the GPU
with random fp16 weights and quantized by ``baq_hf.calibration.quantize_model`` (BAQ allocation, the
paper's calibration protocol by default: 128 windows of 2048 tokens, here random token ids). The
solver's work depends on the shapes, not on the values, so the time per block is what a real
Llama-2-7B gets per block (times 32 for the model), the calibration forwards aside. Reported: wall
seconds of the whole run and per block, the solver's seconds per block (sum of its layers), and the
peak GPU memory. Results: docs/results/quant_time_gpu.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import torch
from generate import CONFIGS, TINY  # benchmarks/generate.py, beside this script
from transformers import LlamaConfig, LlamaForCausalLM

from baq_hf import BaqConfig
from baq_hf.calibration import quantize_model

ROOT = Path(__file__).resolve().parents[1]


def run(args, device: torch.device) -> dict:
    fields = dict(TINY if args.dry_run else CONFIGS["llama2-7b"], num_hidden_layers=args.blocks)
    torch.manual_seed(args.seed)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**fields), dtype=dtype).eval()
    g = torch.Generator().manual_seed(args.seed)
    windows = torch.randint(3, fields["vocab_size"], (args.num_samples, args.seqlen), generator=g)
    config = BaqConfig(
        bits=args.bits, num_samples=args.num_samples, seqlen=args.seqlen, group_size=args.group_size
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = quantize_model(model, windows, config, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    solver = [0.0] * args.blocks
    for name, stats in report["layers"].items():
        solver[int(name.split(".")[2])] += stats["seconds"]  # model.layers.<i>.<...>
    return {
        "blocks": args.blocks,
        "bits": args.bits,
        "group_size": args.group_size,
        "num_samples": args.num_samples,
        "seqlen": args.seqlen,
        "wall_s": wall,
        "wall_per_block_s": wall / args.blocks,
        "solver_per_block_s": solver,
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "code_bits": sum(s["code_bits"] for s in report["layers"].values()) / len(report["layers"]),
    }


def write(result: dict, meta: dict, md: Path, js: Path) -> None:
    js.write_text(json.dumps({"meta": meta, "result": result}, indent=1))
    peak = result["peak_mem_bytes"]
    lines = [
        "# BAQ quantization on a GPU: Llama-2-7B-shaped blocks, random weights",
        "",
        f"- GPU: **{meta['gpu']}**; torch {meta['torch']}, {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- {result['blocks']} decoder blocks of Llama-2-7B's dimensions, fp16; BAQ at {result['bits']:g} "
        f"bits (group_size {result['group_size']}); calibration {result['num_samples']} x {result['seqlen']} "
        "random token ids; wall time includes the calibration forwards; solver time: its layers' sum.",
        "",
        "| blocks | wall s | wall s / block | solver s per block | peak GPU GiB | mean code bits |",
        "|---:|---:|---:|---|---:|---:|",
        f"| {result['blocks']} | {result['wall_s']:.1f} | {result['wall_per_block_s']:.1f} "
        f"| {', '.join(f'{s:.1f}' for s in result['solver_per_block_s'])} "
        f"| {'n/a' if peak is None else f'{peak / 2**30:.2f}'} | {result['code_bits']:.3f} |",
        "",
        f"A 32-block Llama-2-7B at this rate: about {32 * result['wall_per_block_s'] / 60:.1f} minutes.",
        "",
    ]
    md.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--bits", type=float, default=3.0)
    p.add_argument("--group-size", type=int, default=-1)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-md", type=Path, default=ROOT / "docs/results/quant_time_gpu.md")
    p.add_argument("--out-json", type=Path, default=ROOT / "docs/results/quant_time_gpu.json")
    p.add_argument("--dry-run", action="store_true", help="CPU: a tiny Llama, 4 windows of 32 tokens")
    args = p.parse_args(argv)
    if args.dry_run:
        device, args.num_samples, args.seqlen = torch.device("cpu"), 4, 32
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/quant_time_gpu.py needs a CUDA GPU; `--dry-run` runs the same steps on CPU")
    else:
        device = torch.device("cuda")
    meta = {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "none (dry run on CPU)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    result = run(args, device)
    print(json.dumps(result), flush=True)
    write(result, meta, args.out_md, args.out_json)
    print(f"wrote {args.out_md} and {args.out_json}")
    return result


if __name__ == "__main__":
    main()
