"""Quantize a model and publish it on the Hugging Face Hub with a generated model card.

    huggingface-cli login                                   # or set HF_TOKEN
    python examples/quantize_and_push.py your-name/smollm2-135m-baq-2.25
    python examples/quantize_and_push.py your-name/test --dry-run    # write the folder, upload nothing

The upload holds the safetensors checkpoint, config.json (with the BAQ quantization_config), the
tokenizer, baq_report.json and README.md (YAML metadata: base model, quantization: baq, bits, bit
histogram, perplexities; per-layer bit table).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from baq_hf import BaqConfig
from baq_hf.eval import evaluate
from baq_hf.hub import push_to_hub, save_folder
from baq_hf.models import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("repo_id", help="the Hub repository to create or update, e.g. your-name/model-baq")
    parser.add_argument("--model", default="smollm2-135m", help="Hub id, local folder or smollm2-135m")
    parser.add_argument("--base-model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="for the card")
    parser.add_argument("--bits", type=float, default=2.25, help="target mean code bits per weight")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", metavar="DIR", nargs="?", const="out/push-dry-run", help="save only")
    args = parser.parse_args()

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = BaqConfig(bits=args.bits, group_size=64, tokenizer=tokenizer, num_samples=32, seqlen=512)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    ppl = evaluate(model, tokenizer, ["wikitext2"], max_windows=4)  # recorded in the model card

    if args.dry_run:
        save_folder(model, args.dry_run, tokenizer, ppl, base_model=args.base_model, repo_id=args.repo_id)
        print(f"dry run: the upload for {args.repo_id} is in {args.dry_run}")
        return
    commit = push_to_hub(
        model, args.repo_id, tokenizer, ppl, base_model=args.base_model, private=args.private
    )
    print(f"pushed: {commit.commit_url}")


if __name__ == "__main__":
    main()
