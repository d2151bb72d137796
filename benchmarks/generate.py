"""End-to-end batch-1 decode and prefill speed and memory: fp16 vs BaqLinear (Triton kernels).

    python benchmarks/generate.py                          # Llama-2-7B shapes, 3 bits, eager + compiled
    python benchmarks/generate.py --models smollm2-135m --bits 2 2.5 3 4 --modes eager
    TRITON_INTERPRET=1 python benchmarks/generate.py --dry-run   # CPU: every step on a tiny Llama

Models are LlamaForCausalLM built from real configs (written below) with random fp16 weights on the
GPU; every decoder Linear (q, k, v, o, gate, up, down) is then replaced by a BaqLinear with a BAQ-like
bitwidth histogram at the given mean code bits, ranges fitted to the random weight and random codes.
Speed does not depend on the values, so this measures what a real BAQ checkpoint of that shape gets.
Reported per model and mode: decode tokens/s at batch 1 (greedy, fixed length, prefill subtracted) in
HF's eager ``generate`` (dynamic cache) and with a static cache and ``torch.compile(mode=
"reduce-overhead")`` (CUDA graphs; HF's ``compile_config``), for fp16 and BAQ alike; the time of one
``--prefill``-token forward; peak GPU memory; and the linear layers' bytes (stored format, kernel
layout) next to effective_bits x params / 8. Results go to docs/results/generate.md and generate.json.
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
from kernel_bench import random_baq_linear  # benchmarks/kernel_bench.py, beside it
from torch import nn
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

from baq_hf.linear import FORCE_TORCH_ENV, BaqLinear, prepare_kernel_layouts

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
TINY = dict(  # --dry-run
    CONFIGS["llama2-7b"],
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(
    name: str, device: str | torch.device, dtype: torch.dtype = torch.float16
) -> LlamaForCausalLM:
    """A randomly initialized LlamaForCausalLM of the named config, created directly on ``device``."""
    cfg = LlamaConfig(**(TINY if name == "tiny" else CONFIGS[name]))
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


def compile_config(device: torch.device, fullgraph: bool) -> CompileConfig:
    """HF's compile settings for decoding with a static cache: CUDA graphs (reduce-overhead); on CPU (the
    dry run) the eager backend, which checks the tracing without compiling."""
    if device.type == "cuda":
        return CompileConfig(fullgraph=fullgraph, mode="reduce-overhead")
    cfg = CompileConfig(fullgraph=fullgraph, backend="eager", mode=None)
    cfg._compile_all_devices = True
    return cfg


@torch.inference_mode()
def time_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int, mode: str) -> dict:
    """Median wall time of generate() for 1 and for ``new_tokens`` tokens; decode rate from the difference.

    ``mode`` "eager": HF's default dynamic cache, no compilation. "compiled": a static cache and
    torch.compile with CUDA graphs, fullgraph (a graph break is an error), else retried without.
    """
    extra: dict = {}
    fullgraph = True

    def run(k: int) -> float:
        _sync(prompt.device)
        t0 = time.perf_counter()
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=k,
            min_new_tokens=k,
            do_sample=False,
            **extra,
        )
        _sync(prompt.device)
        assert out.shape[1] == prompt.shape[1] + k
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    if mode == "compiled":
        extra = dict(cache_implementation="static", compile_config=compile_config(prompt.device, True))
        try:
            run(min(new_tokens, 8))  # compiles (and records the CUDA graphs)
        except Exception as exc:
            print(f"fullgraph compile failed ({type(exc).__name__}: {exc}); retrying without", flush=True)
            fullgraph = False
            torch._dynamo.reset()
            extra["compile_config"] = compile_config(prompt.device, False)
            run(min(new_tokens, 8))
    run(min(new_tokens, 8))  # warm-up: Triton compiles every kernel variant the model uses here
    warmup_s = time.perf_counter() - t0
    if prompt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = sorted(run(1) for _ in range(repeats))[repeats // 2]
    tn = sorted(run(new_tokens) for _ in range(repeats))[repeats // 2]
    res = {
        "mode": mode,
        "fullgraph": fullgraph if mode == "compiled" else None,
        "warmup_s": warmup_s,
        "new_tokens": new_tokens,
        "prefill_plus_1_s": t1,
        "total_s": tn,
        "decode_tok_s": (new_tokens - 1) / max(tn - t1, 1e-9),
        "ms_per_token": 1e3 * (tn - t1) / (new_tokens - 1),
    }
    if prompt.device.type == "cuda":
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    return res


@torch.inference_mode()
def time_prefill(model: nn.Module, n_tokens: int, vocab: int, repeats: int) -> float:
    """Median seconds of one forward over ``n_tokens`` tokens (batch 1, no cache)."""
    dev = next(model.parameters()).device
    ids = torch.randint(3, vocab, (1, n_tokens), device=dev)
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        _sync(dev)
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[repeats // 2]


def baq_linear_bytes(model: nn.Module) -> int:
    """Bytes the BaqLinear layers keep: their buffers and parameters, which include the kernel
    layouts' codes (the non-persistent buffer ``kernel_codes``; ``weight`` is then empty)."""
    return sum(
        t.numel() * t.element_size()
        for m in model.modules()
        if isinstance(m, BaqLinear)
        for t in (*m.buffers(), *m.parameters())
    )


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _free(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled graphs (and their CUDA graph pools) of the previous model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_model(name: str, bits_list: list[float], args, device: torch.device, save) -> list[dict]:
    """fp16, then BAQ at each mean bitwidth: decode in each mode, prefill, memory. ``save(rows)`` is
    called after every measurement, so that a run stopped by a time limit keeps what it measured."""
    cfg = TINY if name == "tiny" else CONFIGS[name]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    prompt = torch.randint(3, cfg["vocab_size"], (1, args.prompt_len), device=device)
    rows: list[dict] = []
    for bits in [None, *bits_list]:
        model = build_model(name, device, dtype)
        row: dict = {"model": name, "weights": "fp16" if bits is None else f"BAQ {bits:g} bits"}
        if bits is None:
            row["linear_bytes"] = sum(
                lin.weight.numel() * lin.weight.element_size() for *_, lin in decoder_linears(model)
            )
        else:
            row.update(convert_to_baq(model, bits, group_size=args.group_size, seed=args.seed))
            prepare_kernel_layouts(model)  # layouts now (they take over the codes), not in a compiled graph
            row["linear_bytes"] = baq_linear_bytes(model)
        row["model_bytes"] = model_bytes(model)
        if device.type == "cuda":
            row["allocated_bytes"] = torch.cuda.memory_allocated()
        for mode in args.modes:
            row[mode] = time_generate(model, prompt, args.new_tokens, args.repeats, mode)
            print(f"{name} {row['weights']} {mode}: {row[mode]['decode_tok_s']:.1f} tok/s", flush=True)
            _free(device)
        if args.prefill:
            row["prefill_tokens"] = args.prefill
            row["prefill_s"] = time_prefill(model, args.prefill, cfg["vocab_size"], args.repeats)
            print(
                f"{name} {row['weights']} prefill {args.prefill}: {row['prefill_s'] * 1e3:.1f} ms", flush=True
            )
        if rows:
            base = rows[0]
            for mode in args.modes:
                row[mode]["speedup_vs_fp16"] = row[mode]["decode_tok_s"] / base[mode]["decode_tok_s"]
            if args.prefill:
                row["prefill_vs_fp16"] = row["prefill_s"] / base["prefill_s"]
        rows.append(row)
        del model
        _free(device)
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
        "excluded. eager: HF `generate` with its dynamic cache (bound by Python and launches); compiled: "
        "a static cache and `torch.compile(mode='reduce-overhead')` (CUDA graphs) through HF's "
        "`compile_config`, for fp16 and BAQ alike; warm-up (compilation) excluded.",
        f"- prefill: one forward of {meta['prefill']} tokens, batch 1, no cache (BAQ: dequantize W^T + "
        "matmul per layer).",
        "- random weights (fp16 init), decoder Linears converted to BaqLinear with random codes, BAQ-like "
        f"histogram, group_size {meta['group_size']}; embeddings, norms and LM head stay fp16.",
        "- linear MiB: bytes the decoder Linears keep on the GPU (BaqLinear: the kernel layout, which "
        "holds the codes, plus the header, perm, ranges, group index and bias); eff. bits x params / 8 is "
        "the stored format's size from `BaqLinear.effective_bits`.",
        "",
        "| model | weights | code bits | eff. bits | linear MiB | eff. bits x params / 8 MiB | peak GPU MiB "
        "| mode | decode tok/s | ms/token | speedup | prefill ms | prefill / fp16 |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        is_baq = "code_bits" in r
        bits = f"{r['code_bits']:.2f} | {r['effective_bits']:.3f}" if is_baq else "16 | 16"
        ideal = r["effective_bits_x_params_over_8"] if is_baq else r["linear_bytes"]
        prefill = f"{r['prefill_s'] * 1e3:.1f}" if "prefill_s" in r else "n/a"
        for mode in [m for m in meta["modes"] if m in r]:
            d = r[mode]
            label = mode if d["fullgraph"] in (None, True) else f"{mode} (graph breaks)"
            lines.append(
                f"| {r['model']} | {r['weights']} | {bits} | {r['linear_bytes'] / mib:.1f} "
                f"| {ideal / mib:.1f} | {d.get('peak_mem_bytes', 0) / mib:.0f} | {label} "
                f"| {d['decode_tok_s']:.1f} | {d['ms_per_token']:.2f} | {d.get('speedup_vs_fp16', 1.0):.2f}x "
                f"| {prefill} | {r.get('prefill_vs_fp16', 1.0):.2f}x |"
            )
    lines.append("")
    md_path.write_text("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(CONFIGS), default=["llama2-7b"])
    p.add_argument("--bits", nargs="+", type=float, default=[3.0], help="mean code bits of the BAQ models")
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    p.add_argument("--group-size", type=int, default=-1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill", type=int, default=2048, help="tokens of the prefill timing (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-md", type=Path, default=ROOT / "docs/results/generate.md")
    p.add_argument("--out-json", type=Path, default=ROOT / "docs/results/generate.json")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, with TRITON_INTERPRET=1: a tiny Llama, every mode, BaqLinear forced onto the kernels",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--dry-run runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        from baq_hf import kernels

        BaqLinear.forward = lambda self, x: kernels.linear(x, self.kernel_layout(), self.bias)  # on CPU
        device, args.models = torch.device("cpu"), ["tiny"]
        args.new_tokens, args.repeats, args.prefill, args.prompt_len = 3, 1, min(args.prefill, 16), 4
    elif not torch.cuda.is_available():
        sys.exit(
            "benchmarks/generate.py needs a CUDA GPU, and torch.cuda.is_available() is False "
            f"(torch {torch.__version__}). Run it on a GPU machine: `python benchmarks/generate.py`; "
            "`--dry-run` (with TRITON_INTERPRET=1) runs every step on a tiny model on CPU."
        )
    else:
        device = torch.device("cuda")
    if os.environ.get(FORCE_TORCH_ENV):
        sys.exit(f"{FORCE_TORCH_ENV} is set: BaqLinear would not use the Triton kernels; unset it")
    import transformers
    import triton

    meta = {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "none (dry run on CPU)",
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
        "prefill": args.prefill,
        "modes": args.modes,
        "group_size": args.group_size,
    }
    done: list[dict] = []

    def save(rows: list[dict]) -> None:
        write_report(done + rows, meta, args.out_md, args.out_json)

    for name in args.models:
        done += bench_model(name, args.bits, args, device, save)
    print(f"wrote {args.out_md} and {args.out_json}")
    return done


if __name__ == "__main__":
    main()
