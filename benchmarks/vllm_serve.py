"""SmolLM2-135M served by vLLM on CPU: the BAQ checkpoint next to the float model, and against transformers.

    BAQ_HF_VLLM_PYTHON=/path/to/vllm-venv/bin/python python benchmarks/vllm_serve.py

The float model is the embedded SmolLM2-135M (``baq_hf.models``); the BAQ checkpoint is quantized here
(3 bits, groups of 64, 4 windows of 256 tokens of the shipped C4 sample; kept in --work) unless --baq
names one. Measured, all in bfloat16 with vLLM's CPU build (eager):

- agreement: greedy ``--check-tokens`` tokens of each prompt from vLLM and from transformers with the
  same BAQ checkpoint (prompts that agree on all of them; the largest logprob difference over the
  tokens in common; where they part, transformers' margin between its token and vLLM's).
  transformers runs after ``model.dequantize()`` to bf16: the same product as BaqLinear's CPU path,
  which would dequantize every layer at every step;
- throughput: ``--batch`` prompts x ``--tokens`` generated tokens in one ``LLM.generate`` (timed on
  the second of two calls), fp model and BAQ checkpoint served the same way.

Results go to docs/results/vllm.md and vllm.json, with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from vllm_generate import ROOT, compare, run_vllm, transformers_greedy  # benchmarks/, beside it

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
    "In 1969, the first person to walk on the Moon was",
    "A good way to learn a new language is",
    "The largest planet in the solar system is",
    "Photosynthesis is the process by which",
    "To make a cup of tea, first",
    "The main difference between a virus and a bacterium is",
    "Once upon a time, in a small village,",
    "The Python programming language is known for",
    "The heart pumps blood through",
    "An important rule of writing clear code is",
    "The speed of light is approximately",
    "The most popular sport in the world is",
    "Shakespeare wrote many plays, including",
]


def quantized_folder(fp: str, work: Path) -> str:
    """The BAQ checkpoint of the float model (made once, then reused from ``work``)."""
    out = work / "smollm2-135m-baq3-g64"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM

        from baq_hf import BaqConfig

        torch.set_num_threads(1)
        config = BaqConfig(bits=3, group_size=64, num_samples=4, seqlen=256)
        model = AutoModelForCausalLM.from_pretrained(fp, quantization_config=config)
        model.save_pretrained(out)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(fp).save_pretrained(out)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=os.environ.get("BAQ_HF_VLLM_PYTHON"))
    ap.add_argument("--baq", help="a BAQ checkpoint folder of SmolLM2-135M (default: quantize one)")
    ap.add_argument("--work", type=Path, default=ROOT / ".vllm_bench")
    ap.add_argument("--check-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", default="0", help="VLLM_CPU_OMP_THREADS_BIND (cores vLLM's worker uses)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args()
    if not args.vllm_python or not Path(args.vllm_python).exists():
        raise SystemExit("set BAQ_HF_VLLM_PYTHON or --vllm-python to the python of an environment with vLLM")
    from transformers import AutoTokenizer

    from baq_hf.models import resolve_model

    fp = str(resolve_model("smollm2-135m"))
    baq = args.baq or quantized_folder(fp, args.work)
    tokenizer = AutoTokenizer.from_pretrained(fp)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    env = {"VLLM_CPU_OMP_THREADS_BIND": args.threads, "OMP_NUM_THREADS": "1"}
    load = {"before": os.getloadavg()[0]}

    check = run_vllm(
        args.vllm_python,
        {"model": baq, "dtype": "bfloat16", "prompts": prompts, "max_tokens": args.check_tokens},
        args.work / "check",
        env,
    )
    tokens, logprobs = transformers_greedy(baq, prompts, "bfloat16", args.check_tokens, dequantize=True)
    rows = [compare(*r) for r in zip(check["tokens"], check["logprobs"], tokens, logprobs, strict=True)]

    speed = {}
    for name, folder in (("fp (bf16)", fp), ("BAQ 3 bits, g64", baq)):
        request = {
            "model": folder,
            "dtype": "bfloat16",
            "prompts": [prompts[i % len(prompts)] for i in range(args.batch)],
            "max_tokens": args.tokens,
            "logprobs": False,
            "repeats": 2,
        }
        start = time.perf_counter()
        result = run_vllm(args.vllm_python, request, args.work / "speed", env)
        speed[name] = {
            "generated_tokens": result["generated_tokens"],
            "seconds": result["seconds"],
            "tokens_per_s": result["generated_tokens"] / result["seconds"],
            "process_s": time.perf_counter() - start,
            "quantization": result["quantization"],
        }
    load["after"] = os.getloadavg()[0]
    summary = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, vLLM worker on cores {args.threads}",
        "load_average_1min": load,
        "command": "python benchmarks/vllm_serve.py",
        "settings": vars(args) | {"work": str(args.work), "out": str(args.out), "vllm_python": None},
        "agreement": {
            "prompts": len(rows),
            "all_tokens_agree": sum(r[0] == args.check_tokens for r in rows),
            "common_tokens": [r[0] for r in rows],
            "largest_logprob_difference": max(r[1] for r in rows),
            "tie_margins": [r[2] for r in rows if r[0] < args.check_tokens],
        },
        "throughput": speed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm.json").write_text(json.dumps(summary, indent=1) + "\n")
    a = summary["agreement"]
    lines = [
        "# SmolLM2-135M served by vLLM on CPU: BAQ plugin vs transformers, BAQ vs float",
        "",
        f"Machine: {summary['machine']}; 1-minute load average {load['before']:.1f} before, "
        f"{load['after']:.1f} after (the machine is shared). Command: `{summary['command']}` "
        f"(vLLM's CPU build, bfloat16, eager). BAQ checkpoint: 3 bits, groups of 64.",
        "",
        f"Agreement with transformers (same BAQ checkpoint, greedy, {args.check_tokens} tokens, "
        f"{a['prompts']} prompts): **{a['all_tokens_agree']}/{a['prompts']}** prompts agree on every token; "
        f"tokens in common per prompt {a['common_tokens']}; largest logprob difference over the tokens in "
        f"common {a['largest_logprob_difference']:.3f}; where they part, transformers' margin between its "
        f"token and vLLM's: {[round(m, 3) for m in a['tie_margins']]} nats.",
        "",
        f"Throughput: {args.batch} prompts x {args.tokens} tokens in one `LLM.generate` (second call).",
        "",
        "| model | generated tokens | seconds | tokens/s |",
        "|---|---:|---:|---:|",
    ]
    for name, s in speed.items():
        lines.append(f"| {name} | {s['generated_tokens']} | {s['seconds']:.2f} | {s['tokens_per_s']:.1f} |")
    (args.out / "vllm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
