"""Tiny random causal LMs of three architectures, built from configs, so tests run in seconds."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # no GPU: the Triton kernels run in the interpreter, which must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

VOCAB = 128
SEQLEN = 32


def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=128,
        )
        return LlamaForCausalLM(cfg).eval()
    if arch == "opt":
        cfg = OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        )
        return OPTForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128)
        return GPT2LMHeadModel(cfg).eval()
    raise ValueError(arch)


def calibration_ids(n: int = 8, seqlen: int = SEQLEN, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g).tolist()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """A saved float checkpoint folder per architecture."""
    out = {}
    for arch in ("llama", "opt", "gpt2"):
        path = tmp_path_factory.mktemp(f"fp-{arch}")
        tiny_model(arch).save_pretrained(path)
        out[arch] = str(path)
    return out
