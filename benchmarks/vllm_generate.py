"""Greedy generation with vLLM, JSON in and out: run with the Python of an environment that has vLLM.

    python benchmarks/vllm_generate.py REQUEST.json RESULT.json

REQUEST: {"model": DIR, "dtype": "bfloat16", "prompts": [[token ids], ...], "max_tokens": 16,
"logprobs": true, "max_model_len": 256, "tensor_parallel_size": 1, "enforce_eager": true,
"repeats": 1}. RESULT: per prompt the generated token ids and their logprobs, the seconds of the
last repeat and the tokens generated. tests/test_vllm.py and benchmarks/vllm_serve.py call it in a
subprocess (:func:`run_vllm`), with this checkout and baq_hf's plugin entry point visible to vLLM
(PYTHONPATH; the entry point is declared from pyproject.toml exactly as an installed baq_hf declares
it), since vLLM pins its own torch and transformers and so lives in a separate environment. The other
helpers here run in baq_hf's environment and compare vLLM's tokens with transformers'.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with open(sys.argv[1]) as f:
        request = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=request["model"],
        dtype=request.get("dtype", "bfloat16"),
        enforce_eager=request.get("enforce_eager", True),
        max_model_len=request.get("max_model_len", 256),
        tensor_parallel_size=request.get("tensor_parallel_size", 1),
        skip_tokenizer_init=True,
        seed=0,
    )
    params = SamplingParams(
        max_tokens=request.get("max_tokens", 16),
        temperature=0.0,
        logprobs=1 if request.get("logprobs", True) else None,
        ignore_eos=True,
        detokenize=False,
    )
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    quant = llm.llm_engine.vllm_config.quant_config
    for _ in range(request.get("repeats", 1)):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    result = {
        "quantization": None if quant is None else quant.get_name(),
        "seconds": seconds,
        "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "logprobs": [
            [
                step[tok].logprob
                for step, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)
            ]
            if o.outputs[0].logprobs is not None
            else None
            for o in outputs
        ],
    }
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------------------
# the caller's side (baq_hf's environment): run vLLM in its own, compare with transformers


def entry_point_dir(tmp: Path) -> Path:
    """A dist-info declaring pyproject.toml's vllm.general_plugins entry point (what pip install writes)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plugins = project["entry-points"]["vllm.general_plugins"]
    info = tmp / f"baq_hf-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: baq_hf\nVersion: {project['version']}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in plugins.items())
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\n" + lines)
    return tmp


def run_vllm(python: str, request: dict, tmp: Path, env: dict[str, str] | None = None) -> dict:
    """Run this file's :func:`main` with vLLM's ``python`` in a subprocess (``env`` added); its RESULT."""
    tmp.mkdir(parents=True, exist_ok=True)
    req, res = tmp / "request.json", tmp / "result.json"
    req.write_text(json.dumps(request))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(entry_point_dir(tmp / "plugin"))]),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        **(env or {}),
    }
    env.pop("TRITON_INTERPRET", None)  # the tests' setting for their own kernels, not vLLM's
    proc = subprocess.run(
        [python, __file__, str(req), str(res)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(res.read_text())


def transformers_greedy(
    folder: str, prompts: list[list[int]], dtype, max_tokens: int, dequantize: bool = False
) -> tuple[list, list]:
    """Greedy tokens and, per step, the log-probabilities of the whole vocabulary (from the raw logits).

    ``dequantize`` replaces each BaqLinear by a Linear holding its weight dequantized to ``dtype`` once:
    the same product as BaqLinear's CPU path (which dequantizes to the activations' dtype on every
    call), only faster, for models too large to run that way in a benchmark.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    if dequantize:
        model.dequantize()
        dtypes = {m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Linear)}
        assert dtypes == {model.dtype}, dtypes
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: no stop, no EOS suppression
    tokens, logprobs = [], []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        tokens.append(out.sequences[0, len(ids) :].tolist())
        logprobs.append([torch.log_softmax(step[0].float(), -1) for step in out.logits])
    return tokens, logprobs


def compare(got: list[int], got_lp: list[float], want: list[int], want_lp: list) -> tuple:
    """(tokens in common before the first difference, largest logprob difference over them, the margin
    by which transformers preferred its token where vLLM chose another: 0 if none)."""
    same = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), len(want))
    diffs = [
        abs(lp - want_lp[i][tok].item())
        for i, (tok, lp) in enumerate(zip(got[:same], got_lp[:same], strict=True))
    ]
    margin = 0.0
    if same < len(want):
        margin = (want_lp[same][want[same]] - want_lp[same][got[same]]).item()
    return same, max(diffs, default=0.0), margin


if __name__ == "__main__":  # vLLM starts its engine in spawned processes, which re-import this file
    main()
