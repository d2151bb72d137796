"""A BAQ model in a transformers pipeline, then turned back into a plain float model.

python examples/pipeline_usage.py                       # uses out/baq-smollm2 (see load_and_generate.py)
python examples/pipeline_usage.py path/to/baq-model
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import pipeline

import baq_hf


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "folder", nargs="?", default="out/baq-smollm2", help="a saved BAQ model (folder or Hub id)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.folder == "out/baq-smollm2" and not Path(args.folder).exists():
        from load_and_generate import quantize_default  # same folder of examples

        quantize_default(Path(args.folder))

    generator = pipeline("text-generation", model=args.folder, device_map="auto")
    messages = [{"role": "user", "content": "Name three colours."}]
    result = generator(messages, max_new_tokens=args.max_new_tokens, do_sample=False)
    print("BAQ:", result[0]["generated_text"][-1]["content"])

    # model.dequantize() replaces every BaqLinear with an nn.Linear holding the same weights
    generator.model.dequantize()
    assert not any(isinstance(m, baq_hf.BaqLinear) for m in generator.model.modules())
    result = generator(messages, max_new_tokens=args.max_new_tokens, do_sample=False)
    print("dequantized (same weights, plain nn.Linear):", result[0]["generated_text"][-1]["content"])


if __name__ == "__main__":
    main()
