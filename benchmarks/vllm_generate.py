"""Greedy generation with vLLM, JSON in and out: run with the Python of an environment that has vLLM.

    python benchmarks/vllm_generate.py REQUEST.json RESULT.json

REQUEST: {"model": DIR, "dtype": "bfloat16", "prompts": [[token ids], ...], "max_tokens": 16,
"logprobs": true, "max_model_len": 256, "tensor_parallel_size": 1, "enforce_eager": true,
"repeats": 1}. RESULT: per prompt the generated token ids and their logprobs, the seconds of the
last repeat and the tokens generated. tests/test_vllm.py and benchmarks/vllm_serve.py call it in a
subprocess, with baq_hf's plugin entry point visible to vLLM (PYTHONPATH), since vLLM pins its own
torch and transformers and so lives in a separate environment.
"""

from __future__ import annotations

import json
import os
import sys
import time


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


if __name__ == "__main__":  # vLLM starts its engine in spawned processes, which re-import this file
    main()
