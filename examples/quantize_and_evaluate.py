"""Quantize a model with BAQ, compare its perplexity with the float model, save it with a model card.

    python examples/quantize_and_evaluate.py               # SmolLM2-135M at 2.25 bits
    python examples/quantize_and_evaluate.py --bits 3 --model path/to/model --group-size 64

Defaults are small (32 calibration windows of 512 tokens, 4 evaluation windows) so that it finishes
quickly; the GPTQ protocol uses 128 x 2048 calibration tokens and the whole evaluation text.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from baq_hf import BaqConfig
from baq_hf.eval import evaluate
from baq_hf.hub import save_folder
from baq_hf.models import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="Hub id, local folder or smollm2-135m")
    parser.add_argument("--bits", type=float, default=2.25, help="target mean code bits per weight")
    parser.add_argument("--group-size", type=int, default=64, help="columns per range (-1: per row)")
    parser.add_argument("--dataset", default="wikitext2", help="wikitext2, ptb, c4 or a .txt/.jsonl file")
    parser.add_argument("--eval-windows", type=int, default=4, help="2048-token windows to evaluate")
    parser.add_argument("--out", default="out/baq-example", help="where to save the quantized model")
    args = parser.parse_args()

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)

    fp_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fp = evaluate(fp_model, tokenizer, [args.dataset], max_windows=args.eval_windows)[args.dataset]
    del fp_model

    config = BaqConfig(
        bits=args.bits, group_size=args.group_size, tokenizer=tokenizer, num_samples=32, seqlen=512
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    baq = evaluate(model, tokenizer, [args.dataset], max_windows=args.eval_windows)[args.dataset]

    print(
        f"{args.dataset}: float {fp.ppl:.2f}  BAQ {args.bits} bits {baq.ppl:.2f}  ({baq.n_windows} windows)"
    )
    save_folder(model, args.out, tokenizer, {args.dataset: {"fp": fp, "baq": baq}})
    print(f"saved to {args.out}; try: baq-hf inspect {args.out}")


if __name__ == "__main__":
    main()
