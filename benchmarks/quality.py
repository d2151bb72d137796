"""Perplexity of SmolLM2-135M: fp vs uniform GPTQ vs BAQ at several bits, per-row and grouped ranges.

Protocol (the reference one from the issue): C4 calibration windows (seeded) of --seqlen tokens from
the calibration text disjoint from C4 eval; damp 0.01; KV cache off; perplexity on the first
--eval-windows non-overlapping windows of --seqlen tokens of WikiText-2, PTB and C4.

Results are appended to docs/results/quality.json as each run finishes, and docs/results/quality.md is
regenerated from that file, so an interrupted run keeps what it measured.

    python benchmarks/quality.py                 # the full default grid
    python benchmarks/quality.py --only u4 b4    # selected runs
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from shared_data import c4_calibration_text  # benchmarks/shared_data.py, beside this script
from transformers import AutoModelForCausalLM, AutoTokenizer

import baq_hf  # noqa: F401  (registers the quantizer)
from baq_hf import BaqConfig, BaqLinear
from baq_hf.calibration import quantize_model
from baq_hf.data import calibration_windows, resolve_eval_text
from baq_hf.eval import perplexity
from baq_hf.models import smollm2_path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"

# name -> BaqConfig fields
RUNS: dict[str, dict] = {
    "u4": dict(bits=4, allocation="uniform"),
    "b4": dict(bits=4, allocation="baq"),
    "u3": dict(bits=3, allocation="uniform"),
    "b3": dict(bits=3, allocation="baq"),
    "u2g": dict(bits=2, allocation="uniform", group_size=64),
    "b2g": dict(bits=2, allocation="baq", group_size=64),
    "b2.5g": dict(bits=2.5, allocation="baq", group_size=64),
    "u3g": dict(bits=3, allocation="uniform", group_size=64),
    "b3g": dict(bits=3, allocation="baq", group_size=64),
    "u2": dict(bits=2, allocation="uniform"),
    "b2": dict(bits=2, allocation="baq"),
    "b2.5": dict(bits=2.5, allocation="baq"),
    "u2ga": dict(bits=2, allocation="uniform", group_size=64, act_order=True),
    "b2ga": dict(bits=2, allocation="baq", group_size=64, act_order=True),
    "u3ga": dict(bits=3, allocation="uniform", group_size=64, act_order=True),
    "b3ga": dict(bits=3, allocation="baq", group_size=64, act_order=True),
    "b2.5ga": dict(bits=2.5, allocation="baq", group_size=64, act_order=True),
    "b2gm1": dict(bits=2, allocation="baq", group_size=64, min_bits=1),
    # the GPTQ protocol's 128 calibration windows instead of --num-samples
    "u3-n128": dict(bits=3, allocation="uniform", num_samples=128),
    "b3-n128": dict(bits=3, allocation="baq", num_samples=128),
    "b2.5g-n128": dict(bits=2.5, allocation="baq", group_size=64, num_samples=128),
    "p3": dict(bits=3, allocation="paper"),
    "m3": dict(bits=3, allocation="measured"),
    "p2g": dict(bits=2, allocation="paper", group_size=64),
    "m2g": dict(bits=2, allocation="measured", group_size=64),
    # Quality I: the grid-true allocation ("grid") and the Hessian-weighted clip search
    "g3": dict(bits=3, allocation="grid"),
    "g2.5": dict(bits=2.5, allocation="grid"),
    "g2g": dict(bits=2, allocation="grid", group_size=64),
    "u3c": dict(bits=3, allocation="uniform", clip_search=True),
    "b3c": dict(bits=3, allocation="baq", clip_search=True),
    "g3c": dict(bits=3, allocation="grid", clip_search=True),
    "b2.5c": dict(bits=2.5, allocation="baq", clip_search=True),
    "g2.5c": dict(bits=2.5, allocation="grid", clip_search=True),
    "u2c": dict(bits=2, allocation="uniform", clip_search=True),
    "b2c": dict(bits=2, allocation="baq", clip_search=True),
    "g2c": dict(bits=2, allocation="grid", clip_search=True),
    "u2gc": dict(bits=2, allocation="uniform", group_size=64, clip_search=True),
    "b2gc": dict(bits=2, allocation="baq", group_size=64, clip_search=True),
    "g2gc": dict(bits=2, allocation="grid", group_size=64, clip_search=True),
    "u3gc": dict(bits=3, allocation="uniform", group_size=64, clip_search=True),
    "g3gc": dict(bits=3, allocation="grid", group_size=64, clip_search=True),
    "b3gc": dict(bits=3, allocation="baq", group_size=64, clip_search=True),
    # Quality II: one bit budget for the whole model (weights: Fisher or relative output error)
    "bm3c-fisher": dict(
        bits=3, allocation="baq", clip_search=True, budget="model", budget_weighting="fisher"
    ),
    "bm3c-relative": dict(
        bits=3, allocation="baq", clip_search=True, budget="model", budget_weighting="relative"
    ),
    "gm2.5c-fisher": dict(
        bits=2.5, allocation="grid", clip_search=True, budget="model", budget_weighting="fisher"
    ),
    "u3gac": dict(bits=3, allocation="uniform", group_size=64, act_order=True, clip_search=True),
    "g3gac": dict(bits=3, allocation="grid", group_size=64, act_order=True, clip_search=True),
    # Quality III: randomized Hadamard rotation of the inputs (full, or blocks of at most 64 / 128)
    **{
        f"{a}{bits}c-r{suffix}": dict(
            bits=bits, allocation=alloc, clip_search=True, rotation="hadamard", **block
        )
        for bits in (3, 2.5, 2)
        for a, alloc in (("u", "uniform"), ("b", "baq"))
        if alloc != "uniform" or bits == int(bits)
        for suffix, block in (("", {}), ("64", {"rotation_block": 64}), ("128", {"rotation_block": 128}))
    },
}
DATASETS = ("wikitext2", "ptb", "c4")


def evaluate_all(model, tokenizer, seqlen: int, windows: int) -> dict[str, float]:
    texts = {name: resolve_eval_text(name) for name in DATASETS}
    return {
        name: perplexity(model, tokenizer, text, seqlen=seqlen, max_windows=windows, progress=False).ppl
        for name, text in texts.items()
    }


def dense_copy(model):
    """The same model with every BaqLinear replaced by nn.Linear holding its exact dequantized weight
    (identical outputs, but no per-forward unpacking: evaluation on CPU is several times faster)."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, BaqLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data.copy_(module.effective_weight(torch.float32))
            if module.bias is not None:
                linear.bias.data.copy_(module.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, linear)
    return dense


def layer_totals(model) -> dict[str, float]:
    layers = [m for m in model.modules() if isinstance(m, BaqLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    code = sum(m.code_bits * m.in_features * m.out_features for m in layers) / weights
    eff = sum(8 * m.storage_bytes() for m in layers) / weights
    return {"code_bits": code, "effective_bits": eff}


def _seed_runs(record: dict) -> dict[str, dict]:
    """Per calibration seed: {"ppl", "seconds"}; records from before seeds were tracked are seed 0."""
    return record.get("seeds") or {"0": {"ppl": record["ppl"], "seconds": record.get("seconds", 0)}}


def _load(out_json: Path) -> dict[str, dict]:
    return json.loads(out_json.read_text())["records"] if out_json.exists() else {}


def _store(
    out_json: Path,
    meta: dict,
    name: str,
    fields: dict,
    seed: int | None,
    run: dict,
    totals: dict | None = None,
) -> None:
    """Add one run to quality.json and rewrite quality.md, under a lock: several processes may run at once
    (each on one core), and each must see the others' results."""
    with open(out_json.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = _load(out_json)
        record = records.get(name) if records.get(name, {}).get("config") == fields else None
        record = record or {"name": name, "config": fields}
        if seed is None:
            record.update(run)
        else:
            runs = _seed_runs(record) if "ppl" in record else {}
            runs[str(seed)] = run
            record.update(seeds=runs, ppl=runs[min(runs, key=int)]["ppl"], **(totals or {}))
        records[name] = record
        out_json.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        write_markdown(list(records.values()), meta)


def write_markdown(records: list[dict], meta: dict) -> None:
    lines = [
        "# Quality: SmolLM2-135M-Instruct, fp vs uniform GPTQ vs BAQ",
        "",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`.",
        f"Protocol: {meta['protocol']}.",
        "",
        "Caveat: SmolLM2-135M's weights come from a Q4_1 GGUF (each block of 32 input weights has at most 16 "
        "levels), so 4-bit results here are optimistic for any method; per-row and group-64 ranges at 2-3 "
        "bits are the informative regime. Groups are of 64 columns because 128 does not divide the model's "
        "width 576.",
        "",
        "Perplexities are means over the calibration seeds measured (column `seeds`); `WikiText-2 range` "
        "is their min-max. A difference smaller than that spread is noise.",
        "",
        "Quantization times are wall times on a machine shared with other jobs; "
        "[quant_time.md](quant_time.md) compares BAQ and uniform GPTQ in interleaved runs.",
        "",
        "| run | allocation | group | act_order | other | code bits | effective bits | seeds | WikiText-2 | "
        "WikiText-2 range | PTB | C4 | quant. time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = ["fp", *RUNS]
    for r in sorted(records, key=lambda r: order.index(r["name"]) if r["name"] in order else len(order)):
        c = r["config"]
        runs = list(_seed_runs(r).values())
        mean = {k: statistics.fmean(run["ppl"][k] for run in runs) for k in DATASETS}
        wiki = [run["ppl"]["wikitext2"] for run in runs]
        spread = f"{min(wiki):.2f}-{max(wiki):.2f}" if len(wiki) > 1 else "-"
        seconds = statistics.fmean(run.get("seconds", 0) for run in runs)
        other = ", ".join(
            f"{k}={v}" for k, v in c.items() if k not in ("bits", "allocation", "group_size", "act_order")
        )
        lines.append(
            f"| {r['name']} | {c.get('allocation', 'fp')} | {c.get('group_size', '-')} | "
            f"{c.get('act_order', '-')} | {other or '-'} | {r.get('code_bits', 16):.3f} | "
            f"{r.get('effective_bits', 16):.3f} | {','.join(_seed_runs(r))} | "
            f"{mean['wikitext2']:.2f} | {spread} | {mean['ptb']:.2f} | {mean['c4']:.2f} | {seconds:.0f} |"
        )
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", default=list(RUNS), help=f"runs to do, from {list(RUNS)}")
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration and evaluation window length")
    parser.add_argument("--eval-windows", type=int, default=12, help="first N evaluation windows per dataset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds (3: a spread)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="discard earlier results in quality.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / "quality.json"
    if args.fresh:
        out_json.unlink(missing_ok=True)
    meta = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        # runs are added to quality.json one --only at a time: each row is `... --only NAME`
        "command": f"python benchmarks/quality.py --num-samples {args.num_samples} --seqlen {args.seqlen} "
        f"--eval-windows {args.eval_windows} --threads {args.threads} --seeds SEEDS --only NAME",
        "protocol": (
            f"{args.num_samples} C4 calibration windows of {args.seqlen} tokens (seeds listed), damp 0.01, "
            f"first {args.eval_windows} windows of {args.seqlen} tokens of each eval set, fp32 on CPU"
        ),
    }
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows: dict[tuple[int, int], torch.Tensor] = {}  # by (number of windows, seed)
    if "fp" not in _load(out_json):
        fp = evaluate_all(base, tokenizer, args.seqlen, args.eval_windows)
        _store(out_json, meta, "fp", {}, None, {"ppl": fp})
    for name in args.only:
        fields = RUNS[name]
        for seed in args.seeds:
            # the seed also draws a rotation's signs (calibration windows are passed in below)
            config = BaqConfig(
                **{"num_samples": args.num_samples, "seqlen": args.seqlen, "seed": seed, **fields}
            )
            key = (config.num_samples, seed)
            if key not in windows:
                windows[key] = calibration_windows(
                    c4_calibration_text(), tokenizer, key[0], args.seqlen, seed
                )
            model = copy.deepcopy(base)
            start = time.perf_counter()
            report = quantize_model(model, windows[key], config, progress=False)
            seconds = time.perf_counter() - start
            ppl = evaluate_all(dense_copy(model), tokenizer, args.seqlen, args.eval_windows)
            stats = report["layers"].values()
            totals = {"mean_ratio_c": statistics.fmean(s["ratio_c"] for s in stats), **layer_totals(model)}
            _store(out_json, meta, name, fields, seed, {"ppl": ppl, "seconds": seconds}, totals)
            print(name, seed, json.dumps(ppl), f"{seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
