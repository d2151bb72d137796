"""Load a BAQ checkpoint and generate text: `import baq_hf` is all transformers needs.

python examples/load_and_generate.py                  # quantizes SmolLM2 to out/baq-smollm2 first if needed
python examples/load_and_generate.py path/to/baq-model --prompt "The capital of France is"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import baq_hf  # registers the "baq" quantization method with transformers


def quantize_default(folder: Path) -> None:
    """SmolLM2-135M at 3 code bits with groups of 64, so that the example runs without any download."""
    from baq_hf.models import resolve_model

    path = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = baq_hf.BaqConfig(bits=3, group_size=64, tokenizer=tokenizer, num_samples=16, seqlen=512)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "folder", nargs="?", default="out/baq-smollm2", help="a saved BAQ model (folder or Hub id)"
    )
    parser.add_argument("--prompt", default="Write one sentence about the sea.")
    # on CPU every forward unpacks all quantized layers in torch (seconds per token); CUDA uses Triton kernels
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    if args.folder == "out/baq-smollm2" and not Path(args.folder).exists():
        quantize_default(Path(args.folder))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = AutoModelForCausalLM.from_pretrained(args.folder, device_map=device)  # bit-exact reload

    layers = [m for m in model.modules() if isinstance(m, baq_hf.BaqLinear)]
    print(
        f"{len(layers)} BaqLinear layers, {sum(m.code_bits for m in layers) / len(layers):.2f} mean code bits"
    )
    if tokenizer.chat_template:  # SmolLM2-Instruct is a chat model
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False)
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt").to(device)
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
