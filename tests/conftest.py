"""Tiny random causal LMs of three architectures, built from configs, so tests run in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # no GPU: the Triton kernels run in the interpreter, which must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

VOCAB = 128
SEQLEN = 32

# The project's real text (shared/data beside the checkout or above a worktree): read by tests only,
# never by the package; tests that need it skip when it is absent (e.g. on a clean clone).
SHARED_DATA = next(
    (
        folder / "shared" / "data"
        for folder in Path(__file__).resolve().parents[1].parents
        if (folder / "shared" / "data").is_dir()
    ),
    None,
)
# C4 validation documents 1100-1999, the full calibration text of the benchmarks' protocol
C4_CALIBRATION = "c4/c4_val_calib_docs1100-1999_joined.txt"


TINY = {
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=128,
        ),
    ),
    "opt": (
        OPTConfig,
        OPTForCausalLM,
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        ),
    ),
    "gpt2": (
        GPT2Config,
        GPT2LMHeadModel,
        dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128),
    ),
}


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random ``arch`` model in eval mode; ``overrides`` replace config fields (odd sizes, a vocab)."""
    if arch not in TINY:
        raise ValueError(arch)
    config_class, model_class, fields = TINY[arch]
    torch.manual_seed(seed)
    return model_class(config_class(**{**fields, **overrides})).eval()


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


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run faster on one thread: OpenMP's spin-waits dominate 64-wide matmuls, badly so
    when other processes share the cores (20 s instead of 1 s per quantization seen on 2 cores).

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
