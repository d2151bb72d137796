"""CPU runtime of a BAQ model against its float model: forward times, generate tokens/s, peak RSS.

    baq-hf quantize smollm2-135m --bits 3 --group-size 64 --num-samples 4 --seqlen 256 --out /tmp/smol-baq
    python benchmarks/cpu_runtime.py --baq /tmp/smol-baq            # -> docs/results/cpu_runtime.md/.json

Variants, loaded in one process: the float model in fp32 and bf16; the BAQ model loaded in fp32 (the
checkpoint's default) with its packed layers computed exactly in fp32 (the default) and in bf16
(``baq_hf.set_cpu_compute_dtype(model, torch.bfloat16)``, embedding and lm_head stay fp32); and the BAQ
model loaded in bf16. Every BaqLinear runs through baq_hf.kernels.cpu (CPU layouts are built by the
warm-up). Reported per thread count, each measurement taken round-robin over the variants (the machine
may be shared: interleaving keeps the ratios fair): a 1-token forward (no cache), a --seqlen-token
forward, greedy ``generate`` tokens/s after a 16-token prompt, and, from a separate process per
variant, the peak RSS of loading the model and running both forwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fp32", "bf16", "baq-fp32", "baq-fp32-cpubf16", "baq-bf16")


def load(variant: str, baq: str):
    """The model of ``variant``, in eval mode on the CPU."""
    from transformers import AutoModelForCausalLM

    import baq_hf
    from baq_hf.models import resolve_model

    dtype = torch.bfloat16 if variant.endswith("-bf16") or variant == "bf16" else torch.float32
    path = baq if variant.startswith("baq") else resolve_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if variant.endswith("cpubf16"):
        baq_hf.set_cpu_compute_dtype(model, torch.bfloat16)
    return model


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function: one warm-up each, then ``repeats`` round-robin rounds."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(models: dict, seqlen: int, new_tokens: int, repeats: int) -> dict[str, dict]:
    """Per variant: 1-token and ``seqlen``-token forward seconds and generate tokens/s, interleaved."""
    g = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values())).config.vocab_size
    one = torch.randint(0, vocab, (1, 1), generator=g)
    long = torch.randint(0, vocab, (1, seqlen), generator=g)
    prompt = torch.randint(0, vocab, (1, 16), generator=g)

    def gen(model):
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    with torch.inference_mode():
        f1 = interleaved({v: (lambda m=m: m(one, use_cache=False)) for v, m in models.items()}, 5 * repeats)
        fl = interleaved({v: (lambda m=m: m(long, use_cache=False)) for v, m in models.items()}, repeats)
        tg = interleaved({v: (lambda m=m: gen(m)) for v, m in models.items()}, max(1, repeats // 2))
    return {
        v: {"forward_1_s": f1[v], f"forward_{seqlen}_s": fl[v], "generate_tokens_per_s": new_tokens / tg[v]}
        for v in models
    }


def peak_rss(variant: str, args) -> float:
    """MiB: a fresh process loads ``variant`` and runs a 1-token and a --seqlen-token forward."""
    cmd = [sys.executable, __file__, "--baq", args.baq, "--rss-of", variant, "--seqlen", str(args.seqlen)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def rss_child(variant: str, args) -> None:
    torch.set_num_threads(1)
    model = load(variant, args.baq)
    with torch.inference_mode():
        model(torch.zeros(1, 1, dtype=torch.long), use_cache=False)
        model(torch.zeros(1, args.seqlen, dtype=torch.long), use_cache=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "load_average": os.getloadavg()}


def write_report(rows: list[dict], rss: dict, meta: dict, seqlen: int, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows, "peak_rss_mib": rss}, indent=1)
    )
    lines = [
        "# CPU runtime: BAQ vs float (SmolLM2-135M)",
        "",
        f"`python benchmarks/cpu_runtime.py --baq {meta['baq']}`; {meta['cpu']}, {meta['cores']} cores, "
        f"torch {meta['torch']}; load average {meta['load_before']} before, {meta['load_after']} after "
        "(the machine is shared: ratios measured interleaved in one process are the numbers to read).",
        "",
        f"| threads | variant | 1-token forward ms | {seqlen}-token forward ms | generate tok/s | "
        "vs fp32: 1-token | vs fp32: long | vs fp32: tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(b for b in rows if b["threads"] == r["threads"] and b["variant"] == "fp32")
        lines.append(
            f"| {r['threads']} | {r['variant']} | {1e3 * r['forward_1_s']:.1f} | "
            f"{1e3 * r[f'forward_{seqlen}_s']:.0f} | {r['generate_tokens_per_s']:.1f} | "
            f"{r['forward_1_s'] / base['forward_1_s']:.2f}x | "
            f"{r[f'forward_{seqlen}_s'] / base[f'forward_{seqlen}_s']:.2f}x | "
            f"{r['generate_tokens_per_s'] / base['generate_tokens_per_s']:.2f}x |"
        )
    lines += ["", "Peak RSS (1 thread, separate process per variant: load, 1-token and long forward):", ""]
    lines += ["| variant | peak RSS MiB | vs fp32 |", "|---|---|---|"]
    lines += [f"| {v} | {mib:.0f} | {mib / rss['fp32']:.2f}x |" for v, mib in rss.items()]
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baq", required=True, help="folder of a BAQ checkpoint of SmolLM2-135M")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="rounds of long forwards (x5 for 1-token ones)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "cpu_runtime.md")
    p.add_argument("--rss-of", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_of:
        return rss_child(args.rss_of, args)
    meta = {**machine(), "baq": args.baq, "load_before": os.getloadavg()}
    models = {v: load(v, args.baq) for v in args.variants}
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for variant, row in measure(models, args.seqlen, args.new_tokens, args.repeats).items():
            rows.append({"threads": threads, "variant": variant, **row})
            print(rows[-1], flush=True)
    del models
    rss = {} if args.no_rss else {v: peak_rss(v, args) for v in args.variants}
    meta["load_after"] = os.getloadavg()
    write_report(rows, rss, meta, args.seqlen, args.out)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
