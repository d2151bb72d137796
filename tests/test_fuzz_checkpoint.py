"""Fuzzing the BAQ checkpoint loader with mutated safetensors files (hypothesis).

Every mutated checkpoint must either fail cleanly (ValueError, RuntimeError, OSError or a safetensors
error, with a message) or load into a model whose BaqLinear layers validate, dequantize and run. Layers
that load are also dequantized by the Triton kernel (interpreter mode on CPU) from their kernel layout,
with every tensor the kernel reads placed between guard values, and must give the torch reference bit
for bit: an out-of-bounds read would pull in a guard value.
"""

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import torch

_NEED_INTERPRETER = not torch.cuda.is_available()
# triton imported before the flag was set: its kernels would not be interpreted (see test_kernels.py)
_STALE_TRITON = _NEED_INTERPRETER and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if _NEED_INTERPRETER and not _STALE_TRITON:  # setting it now would fool test_kernels.py's same check
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from baq_hf import BaqConfig, BaqLinear  # noqa: E402
from baq_hf import format as fmt  # noqa: E402
from baq_hf.calibration import quantize_model  # noqa: E402
from baq_hf.checkpoint import round_unquantized, storage_state_dict  # noqa: E402

from .conftest import tiny_model  # noqa: E402

CLEAN_ERRORS = (ValueError, RuntimeError, OSError, SafetensorError)
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"]
ITEMSIZE = dict(F64=8, F32=4, F16=2, BF16=2, I64=8, I32=4, I16=2, I8=1, U8=1, BOOL=1)
BAQ_TENSORS = tuple(n for n in fmt.TENSOR_NAMES if n != fmt.BIAS)  # the declared packed tensors

try:
    import triton  # noqa: F401

    from baq_hf.kernels import dequantize as dequantize_kernel
    from baq_hf.kernels.triton_kernels import dequantize as dequantize_layout

    KERNELS = not _STALE_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    KERNELS = False


pytestmark = pytest.mark.usefixtures("single_thread")


def odd_llama() -> torch.nn.Module:
    """One block, in_features 40 (not a multiple of 32) and 45 (odd), with biases in attention."""
    return tiny_model(
        "llama",
        seed=1,
        hidden_size=40,
        intermediate_size=45,
        num_hidden_layers=1,
        vocab_size=64,
        attention_bias=True,
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A saved BAQ checkpoint: groups of 5 columns, act_order (scattered groups), 0..8-bit columns, biases."""
    model = odd_llama()
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    config = BaqConfig(bits=2.5, group_size=5, act_order=True, num_samples=4, seqlen=16)
    quantize_model(model, windows, config, progress=False)
    model.config.quantization_config = config
    path = tmp_path_factory.mktemp("fuzz-source")
    # as baq_hf saves by default: embeddings, norms and biases (BaqLinear's too) in bfloat16
    round_unquantized(model, torch.bfloat16)
    model.save_pretrained(path, state_dict=storage_state_dict(model, torch.bfloat16))
    return path


# ----------------------------------------------------------------------------------------------
# raw safetensors editing


def read_raw(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_raw(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def mutate(folder: Path, kind: str, rnd: random.Random) -> str:
    """Apply one mutation of ``kind`` to folder/model.safetensors; returns a description."""
    path = folder / "model.safetensors"
    header, data = read_raw(path)
    names = sorted(k for k in header if k != "__metadata__")
    baq_names = [k for k in names if k.rpartition(".")[2] in BAQ_TENSORS and ".layers." in k]
    target = rnd.choice(baq_names if rnd.random() < 0.8 else names)
    if kind == "flip_data":
        start, end = header[target]["data_offsets"]
        buf = bytearray(data)
        for _ in range(rnd.randint(1, 4)):
            if end > start:
                buf[rnd.randrange(start, end)] ^= 1 << rnd.randrange(8)
        data = bytes(buf)
        write_raw(path, header, data)
        return f"flip bits in {target}"
    if kind == "flip_header":
        blob = bytearray(path.read_bytes())
        (n,) = struct.unpack("<Q", blob[:8])
        pos = rnd.randrange(0, 8 + n)
        blob[pos] ^= 1 << rnd.randrange(8)
        path.write_bytes(bytes(blob))
        return f"flip a bit of header byte {pos}"
    if kind == "truncate":
        blob = path.read_bytes()
        cut = rnd.randrange(0, len(blob))
        path.write_bytes(blob[:cut])
        return f"truncate to {cut} bytes"
    if kind == "retype":
        entry = header[target]
        start, end = entry["data_offsets"]
        new = rnd.choice(DTYPES)
        nbytes = end - start
        if nbytes % ITEMSIZE[new] == 0 and rnd.random() < 0.8:
            count = nbytes // ITEMSIZE[new]
            entry["shape"] = [count] if len(entry["shape"]) == 1 or count == 0 else [1, count]
        entry["dtype"] = new
        write_raw(path, header, data)
        return f"retype {target} as {new} {entry['shape']}"
    if kind == "reshape":
        entry = header[target]
        count = 1
        for d in entry["shape"]:
            count *= d
        divisors = [d for d in range(1, count + 1) if count % d == 0] or [1]
        d = rnd.choice(divisors)
        entry["shape"] = rnd.choice([[d, count // d], [count // d, d], [count], [1, count], [count + 1]])
        write_raw(path, header, data)
        return f"reshape {target} to {entry['shape']}"
    tensors = load_file(str(path))
    if kind == "drop":
        del tensors[target]
        desc = f"drop {target}"
    elif kind == "rename":
        layer, _, leaf = target.rpartition(".")
        siblings = [k for k in tensors if k.rpartition(".")[0] == layer and k != target]
        if siblings and rnd.random() < 0.5:  # swap two tensors of one layer (perm <-> group_index, ...)
            other = rnd.choice(siblings)
            tensors[target], tensors[other] = tensors[other], tensors[target]
            desc = f"swap {target} and {other}"
        else:
            new = rnd.choice([f"{layer}.{leaf}_", f"{layer}x.{leaf}", target.replace("layers.0", "layers.7")])
            tensors[new] = tensors.pop(target)
            desc = f"rename {target} to {new}"
    elif kind == "randomize":
        t = tensors[target]
        raw = torch.randint(0, 256, (t.numel() * t.element_size(),), dtype=torch.uint8, generator=None)
        tensors[target] = raw.view(t.dtype).reshape(t.shape) if t.numel() else t
        desc = f"randomize {target}"
    else:
        raise ValueError(kind)
    save_file(tensors, str(path), {"format": "pt"})
    return desc


# ----------------------------------------------------------------------------------------------
# checking one mutated checkpoint


def guarded(t: torch.Tensor, guard: int = 64) -> torch.Tensor:
    """A copy of ``t`` living in the middle of a larger buffer filled with a poison value."""
    flat = t.reshape(-1)
    poison = float("nan") if t.dtype.is_floating_point else torch.iinfo(t.dtype).max
    big = torch.full((flat.numel() + 2 * guard,), poison, dtype=t.dtype)
    big[guard : guard + flat.numel()] = flat
    return big[guard : guard + flat.numel()].view(t.shape)


LAYOUT_TENSORS = ("codes", "colmap", "group_of", "range_min", "range_max")


def guard_layout(layout) -> None:
    for name in LAYOUT_TENSORS:
        t = getattr(layout, name)
        if t is not None:
            setattr(layout, name, guarded(t))


def check_kernel(layer: BaqLinear) -> None:
    """The kernel layout of a loaded layer, its tensors between guards, dequantizes exactly."""
    ref = layer.dequantize()
    layout = layer.kernel_layout()
    guard_layout(layout)
    assert torch.equal(dequantize_kernel(layer.kernel_layout(), torch.float32), ref)  # the guarded layout


def load_and_run(folder: Path, kernels: bool) -> bool:
    """True if the checkpoint loaded (and then validated and ran); False on a clean error."""
    try:
        model = AutoModelForCausalLM.from_pretrained(folder)
    except CLEAN_ERRORS as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return False
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BaqLinear)}
    assert layers, "a BAQ checkpoint loaded without any BaqLinear"
    for name, layer in layers.items():
        layer.validate(name)
        w = layer.dequantize()
        assert w.shape == (layer.out_features, layer.in_features)
        assert torch.isfinite(w).all()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    if kernels:
        for layer in layers.values():
            check_kernel(layer)
    return True


KINDS = ["flip_data", "flip_header", "truncate", "retype", "reshape", "drop", "rename", "randomize"]


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1), second=st.booleans())
def test_mutated_checkpoints_fail_cleanly_or_load_valid(source, tmp_path_factory, kind, seed, second):
    rnd = random.Random(seed)
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(source, folder, dirs_exist_ok=True)
    if second:  # first a mutation that keeps the file well-formed, so that both take effect
        mutate(folder, rnd.choice(["flip_data", "randomize", "rename"]), rnd)
    mutate(folder, kind, rnd)
    load_and_run(folder, kernels=False)


@pytest.mark.skipif(not _STALE_TRITON, reason="the kernel checks run in this process")
def test_kernel_checks_in_fresh_process() -> None:
    """triton was imported before TRITON_INTERPRET=1 could be set: run the kernel checks in a new process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        __file__,
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        "kernel and not fresh",
    ]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.skipif(not KERNELS, reason="Triton kernels unavailable or not in interpreter mode")
def test_kernel_guard_detects_out_of_bounds_reads(source):
    """The guard check below is able to see an out-of-bounds read: a layer missing its last code word."""
    model = AutoModelForCausalLM.from_pretrained(source)
    assert load_and_run(source, kernels=True)
    layer = model.model.layers[0].mlp.down_proj
    ref = layer.dequantize()
    layout = layer.kernel_layout()
    layout.codes = layout.codes[:-1].clone()  # a layout missing its last word row: the kernel overruns
    guard_layout(layout)
    assert not torch.equal(dequantize_layout(layout, torch.float32), ref)


def random_valid_layer(tensors: dict, layer: str, rnd: random.Random) -> None:
    """Replace a layer's tensors by random ones that pass validation: any sorted 0..15-bit header, any
    permutation and group assignment, random code words of the right count, extreme but valid ranges."""
    g = torch.Generator().manual_seed(rnd.randrange(2**31))
    n = tensors[f"{layer}.perm"].numel()
    m, n_groups = tensors[f"{layer}.range_min"].shape
    widths = sorted(rnd.sample(range(fmt.MAX_BITS + 1), rnd.randint(1, 5)))
    bits = torch.tensor(sorted(rnd.choice(widths) for _ in range(n)))
    tensors[f"{layer}.bits_header"] = fmt.pack_header(bits)
    n_words = fmt.total_words(fmt.segments_from_bits(bits, m), m)
    tensors[f"{layer}.weight"] = torch.randint(-(2**31), 2**31 - 1, (n_words,), generator=g).to(torch.int32)
    tensors[f"{layer}.perm"] = torch.randperm(n, generator=g).to(torch.int32)
    if f"{layer}.group_index" in tensors:
        tensors[f"{layer}.group_index"] = torch.randint(0, n_groups, (n,), generator=g).to(torch.int32)
    lo = rnd.choice([-65504.0, -1e-4, 0.0, -3.0, 6e-8])
    hi = rnd.choice([65504.0, 1.2e-7, 2.0, 0.5])
    lo, hi = min(lo, hi), max(lo, hi)
    tensors[f"{layer}.range_min"] = torch.full((m, n_groups), lo, dtype=torch.float16)
    tensors[f"{layer}.range_max"] = torch.full((m, n_groups), hi, dtype=torch.float16)


@pytest.mark.skipif(not KERNELS, reason="Triton kernels unavailable or not in interpreter mode")
@settings(
    max_examples=6, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(seed=st.integers(0, 2**32 - 1))
def test_kernel_never_reads_out_of_bounds_on_corrupted_valid_layers(source, tmp_path_factory, seed):
    """Layers corrupted in all ways validation cannot see (codes, widths, order, groups): exact, in bounds."""
    rnd = random.Random(seed)
    folder = tmp_path_factory.mktemp("fuzzk")
    shutil.copytree(source, folder, dirs_exist_ok=True)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.endswith(".bits_header")]:
        random_valid_layer(tensors, key.rpartition(".")[0], rnd)
    save_file(tensors, str(path), {"format": "pt"})
    assert load_and_run(folder, kernels=True)
