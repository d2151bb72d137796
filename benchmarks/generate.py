"""End-to-end batch-1 generation speed and memory: fp16 vs BaqLinear (fused Triton kernels).

    python benchmarks/generate.py                          # SmolLM2-135M and Llama-2-7B shapes, 3 bits
    python benchmarks/generate.py --models smollm2-135m --bits 2 2.5 3 4
    python benchmarks/generate.py --dry-run                # CPU: conversion + a few torch-path tokens

Models are LlamaForCausalLM built from real configs (written below) with random fp16 weights on the
GPU; every decoder Linear (q, k, v, o, gate, up, down) is then replaced by a BaqLinear with a BAQ-like
bitwidth histogram at the given mean code bits, ranges fitted to the random weight and random codes.
Speed does not depend on the values, so this measures what a real BAQ checkpoint of that shape gets.
Reported per model: decode tokens/s at batch 1 (greedy, fixed length, prefill subtracted), peak GPU
memory while generating, and the linear layers' bytes next to effective_bits x params / 8.
Results go to docs/results/generate.md and generate.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from kernel_bench import random_baq_linear  # benchmarks/kernel_bench.py, beside this script
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from baq_hf.linear import FORCE_TORCH_ENV, BaqLinear

ROOT = Path(__file__).resolve().parents[1]

# Published configs (Llama-2-7B: meta-llama/Llama-2-7b-hf; SmolLM2-135M: HuggingFaceTB/SmolLM2-135M).
CONFIGS = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(
    name: str, device: str | torch.device, dtype: torch.dtype = torch.float16
) -> LlamaForCausalLM:
    """A randomly initialized LlamaForCausalLM of the named config, created directly on ``device``."""
    cfg = LlamaConfig(**CONFIGS[name])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


def decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, Linear) of every projection in the decoder layers (not the LM head)."""
    out = []
    for mod in model.model.layers.modules():
        for child_name, child in mod.named_children():
            if child_name in LINEAR_NAMES and isinstance(child, nn.Linear):
                out.append((mod, child_name, child))
    return out


def convert_to_baq(model: nn.Module, mean_bits: float, group_size: int = -1, seed: int = 0) -> dict:
    """Replace every decoder Linear by a random-code BaqLinear in place; returns size accounting.

    Each layer gets its own :func:`baq_bits` histogram (seeded per layer) and ranges fitted to the
    Linear's weight, so activations keep the fp16 model's scale. The fp16 weights are released.
    """
    params = fp16_bytes = baq_bytes = ideal_bits = 0
    code_bits = 0.0
    for i, (parent, attr, lin) in enumerate(decoder_linears(model)):
        m, n = lin.out_features, lin.in_features
        layer = random_baq_linear(
            m,
            n,
            mean_bits,
            group_size=group_size,
            weight=lin.weight,
            bias=lin.bias,
            seed=seed + i,
            device=lin.weight.device,
            dtype=lin.weight.dtype,
        )
        params += m * n
        fp16_bytes += sum(t.numel() * t.element_size() for t in lin.parameters())
        baq_bytes += sum(t.numel() * t.element_size() for t in (*layer.buffers(), *layer.parameters()))
        ideal_bits += layer.effective_bits * m * n
        code_bits += layer.code_bits * m * n
        setattr(parent, attr, layer)
        del lin
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "linear_params": params,
        "linear_dense_bytes": fp16_bytes,
        "linear_baq_bytes": baq_bytes,
        "effective_bits_x_params_over_8": ideal_bits / 8,
        "code_bits": code_bits / params,
        "effective_bits": ideal_bits / params,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Median wall time of generate() for 1 and for ``new_tokens`` tokens; decode rate from the difference."""

    def run(k: int) -> float:
        _sync(prompt.device)
        t0 = time.perf_counter()
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=k,
            min_new_tokens=k,
            do_sample=False,
        )
        _sync(prompt.device)
        assert out.shape[1] == prompt.shape[1] + k
        return time.perf_counter() - t0

    run(min(new_tokens, 8))  # warm-up: Triton compiles every kernel variant the model uses here
    if prompt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = sorted(run(1) for _ in range(repeats))[repeats // 2]
    tn = sorted(run(new_tokens) for _ in range(repeats))[repeats // 2]
    res = {
        "new_tokens": new_tokens,
        "prefill_plus_1_s": t1,
        "total_s": tn,
        "decode_tok_s": (new_tokens - 1) / max(tn - t1, 1e-9),
        "ms_per_token": 1e3 * (tn - t1) / (new_tokens - 1),
    }
    if prompt.device.type == "cuda":
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    return res


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def bench_model(name: str, bits_list: list[float], args) -> list[dict]:
    dev = torch.device("cuda")
    rows = []
    prompt = torch.randint(3, CONFIGS[name]["vocab_size"], (1, args.prompt_len), device=dev)
    model = build_model(name, dev)
    fp16 = time_generate(model, prompt, args.new_tokens, args.repeats)
    fp16_linear = sum(lin.weight.numel() * 2 for _, _, lin in decoder_linears(model))
    rows.append(
        {
            "model": name,
            "weights": "fp16",
            "model_bytes": model_bytes(model),
            "allocated_bytes": torch.cuda.memory_allocated(),
            "linear_bytes": fp16_linear,
            **fp16,
        }
    )
    print(
        f"{name} fp16: {fp16['decode_tok_s']:.1f} tok/s, peak {fp16['peak_mem_bytes'] / 2**30:.2f} GiB",
        flush=True,
    )
    del model
    gc.collect()
    torch.cuda.empty_cache()
    for bits in bits_list:
        model = build_model(name, dev)
        sizes = convert_to_baq(model, bits, group_size=args.group_size, seed=args.seed)
        res = time_generate(model, prompt, args.new_tokens, args.repeats)
        rows.append(
            {
                "model": name,
                "weights": f"BAQ {bits:g} bits",
                "model_bytes": model_bytes(model),
                "allocated_bytes": torch.cuda.memory_allocated(),
                "linear_bytes": sizes["linear_baq_bytes"],
                **sizes,
                **res,
                "speedup_vs_fp16": res["decode_tok_s"] / fp16["decode_tok_s"],
            }
        )
        print(
            f"{name} BAQ {bits:g}: {res['decode_tok_s']:.1f} tok/s ({rows[-1]['speedup_vs_fp16']:.2f}x), "
            f"peak {res['peak_mem_bytes'] / 2**30:.2f} GiB, "
            f"linear {sizes['linear_baq_bytes'] / 2**20:.1f} MiB "
            f"(eff. bits x params / 8 = {sizes['effective_bits_x_params_over_8'] / 2**20:.1f} MiB)",
            flush=True,
        )
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def write_report(rows: list[dict], meta: dict, md_path: Path, json_path: Path) -> None:
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    mib = 2**20
    lines = [
        "# End-to-end generation: fp16 vs BaqLinear",
        "",
        f"- GPU: **{meta['gpu']}**; torch {meta['torch']}, triton {meta['triton']}, "
        f"transformers {meta['transformers']}, CUDA {meta['cuda']}, {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- batch 1, greedy, prompt {meta['prompt_len']} tokens, {meta['new_tokens']} new tokens, "
        f"median of {meta['repeats']}; decode tok/s = (new - 1) / (t(new) - t(1)), so prefill is "
        "excluded. HF eager `generate` (dynamic cache, no CUDA graphs): small models are bound by "
        "Python/launch overhead.",
        "- random weights (fp16 init), decoder Linears converted to BaqLinear with random codes, BAQ-like "
        f"histogram, group_size {meta['group_size']}; embeddings, norms and LM head stay fp16.",
        "- linear MiB: bytes of the tensors the decoder Linears hold (BaqLinear: codes, header, perm, "
        "ranges, group index, bias); eff. bits x params / 8 is the same count from "
        "`BaqLinear.effective_bits`.",
        "",
        "| model | weights | code bits | eff. bits | linear MiB | eff. bits x params / 8 MiB | model MiB "
        "| peak GPU MiB | decode tok/s | ms/token | speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        is_baq = "code_bits" in r
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['code_bits']:.2f} | {r['effective_bits']:.3f} "
            if is_baq
            else f"| {r['model']} | {r['weights']} | 16 | 16 "
        )
        lines[-1] += (
            f"| {r['linear_bytes'] / mib:.1f} "
            f"| {(r['effective_bits_x_params_over_8'] / mib) if is_baq else r['linear_bytes'] / mib:.1f} "
            f"| {r['model_bytes'] / mib:.1f} | {r.get('peak_mem_bytes', 0) / mib:.0f} "
            f"| {r['decode_tok_s']:.1f} | {r['ms_per_token']:.2f} "
            f"| {r.get('speedup_vs_fp16', 1.0):.2f}x |"
        )
    lines.append("")
    md_path.write_text("\n".join(lines))


def dry_run(args) -> None:
    """CPU: parameter counts of every config (meta device), then convert SmolLM2-135M and decode 3 tokens
    through BaqLinear's torch path, to check the conversion without a GPU."""
    for name in args.models:
        with torch.device("meta"):
            model = LlamaForCausalLM._from_config(LlamaConfig(**CONFIGS[name]), dtype=torch.float16)
        n_lin = sum(lin.weight.numel() for _, _, lin in decoder_linears(model))
        print(
            f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
            f"decoder linears {n_lin / 1e6:.1f} M"
        )
    model = build_model("smollm2-135m", "cpu", dtype=torch.float32)
    prompt = torch.randint(3, 49152, (1, 8))
    with torch.inference_mode():
        ref = model(prompt).logits
    t0 = time.perf_counter()
    sizes = convert_to_baq(model, args.bits[0], group_size=args.group_size, seed=args.seed)
    n_baq = sum(isinstance(m, BaqLinear) for m in model.modules())
    print(f"converted {n_baq} Linears in {time.perf_counter() - t0:.1f} s: {json.dumps(sizes)}")
    with torch.inference_mode():
        logits = model(prompt).logits
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
        )
    assert torch.isfinite(logits).all(), "BAQ model produced non-finite logits"
    print(
        f"logits finite, |logits| {logits.abs().mean():.3f} (fp32 random model {ref.abs().mean():.3f}); "
        f"generated {tuple(out.shape)}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--bits", nargs="+", type=float, default=[3.0], help="mean code bits of the BAQ models")
    p.add_argument("--group-size", type=int, default=-1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-md", type=Path, default=ROOT / "docs/results/generate.md")
    p.add_argument("--out-json", type=Path, default=ROOT / "docs/results/generate.json")
    p.add_argument("--dry-run", action="store_true", help="CPU only: check the model conversion")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        dry_run(args)
        return
    if not torch.cuda.is_available():
        sys.exit(
            "benchmarks/generate.py needs a CUDA GPU, and torch.cuda.is_available() is False "
            f"(torch {torch.__version__}). Run it on a GPU machine: `python benchmarks/generate.py`; "
            "`--dry-run` checks the model conversion on CPU."
        )
    if os.environ.get(FORCE_TORCH_ENV):
        sys.exit(f"{FORCE_TORCH_ENV} is set: BaqLinear would not use the Triton kernels; unset it")
    import transformers
    import triton

    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "group_size": args.group_size,
    }
    rows = []
    for name in args.models:
        rows += bench_model(name, args.bits, args)
    write_report(rows, meta, args.out_md, args.out_json)
    print(f"wrote {args.out_md} and {args.out_json}")


if __name__ == "__main__":
    main()
