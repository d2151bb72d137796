"""Reliability under real faults: SIGKILLed runs, a full disk, and the loader over fuzzed checkpoints.

Runs the real CLI (``python -m baq_hf.cli quantize``, the ``baq-hf`` entry point) as a subprocess on a
tiny random LLaMA with SmolLM2's tokenizer:

- kills: SIGKILL at seeded random moments, each anchored on something observed from outside (a log line
  on stderr, a file appearing in the resume folder or the save's temporary folder) plus a random delay
  taken from an uninterrupted run's timeline, so kills spread over loading/calibration, GPTQ, the
  resume-state writes and the final save without any hook in the product; each killed run is rerun
  until it completes and its folder is compared byte for byte with the uninterrupted run's;
- disk full: ``--out`` on a small tmpfs (mounted here, needs root) that cannot hold the save;
- fuzz: >= 10,000 mutated checkpoints (the mutations of tests/test_fuzz_checkpoint.py plus new optional
  fields and metadata edits) through the real loading path, each in a worker process under a watchdog.

    python benchmarks/faults.py                      # docs/results/faults.md and faults.json
    python benchmarks/faults.py --kills 3 --fuzz 300 # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
sys.path.insert(0, str(ROOT))  # this checkout's baq_hf, and tests/ (the fuzz test's mutations)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# settings of the quantize command: act_order + groups exercise every stored tensor
CLI_SETTINGS = [
    "--bits",
    "2.5",
    "--group-size",
    "32",
    "--act-order",
    "--num-samples",
    "16",
    "--seqlen",
    "128",
]
# keys of baq_report.json that measure the run rather than describe the model (seconds of wall time)
TIMING_KEYS = ("seconds", "timing")
CARD_TIMING = "| calibration time |"  # the model card's row of wall time
TIMED_FILES = ("baq_report.json", "README.md")  # compared without those fields (their own digests)


# ---------------------------------------------------------------------------------------------- model


def build_model(folder: Path) -> None:
    """A random 6-block LLaMA (hidden 128) saved with the embedded SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from baq_hf.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def quantize_command(model: Path, out: Path, state: Path) -> list[str]:
    return [sys.executable, "-m", "baq_hf.cli", "quantize", str(model), "--out", str(out), "--resume",
            str(state), "--overwrite", "--no-progress", *CLI_SETTINGS]  # fmt: skip


# ---------------------------------------------------------------------------------------------- runs


class Run:
    """One CLI run watched from outside: stderr lines and new names in the watched folders, timestamped.

    ``kill_at(event, delay)`` SIGKILLs the process ``delay`` seconds after ``event`` is first seen
    (``line:<text>``, ``file:<name>`` in a watched folder; temporary save folders are named
    ``file:.<out>.incomplete``).
    """

    def __init__(
        self, cmd: list[str], watch: list[Path], kill: tuple[str, float] | None = None, action: Any = None
    ):
        self.events: dict[str, float] = {}
        self._temps = 0
        self._action = action  # instead of the kill: called once at the kill moment
        self.lines: list[str] = []
        self.killed_at: float | None = None
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        self._kill = kill
        self._watch = watch
        threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._poll, daemon=True),
        ]
        for t in threads:
            t.start()
        self.rc = self.proc.wait()
        self.seconds = time.perf_counter() - self.start
        for t in threads:
            t.join(timeout=5)

    def _seen(self, event: str) -> None:
        if event not in self.events:
            self.events[event] = time.perf_counter() - self.start

    def _event_name(self, name: str) -> str:
        """Random parts of names replaced: ``.out.incomplete``, ``.tmp#3`` (the third temporary file that
        safetensors wrote, under its random name, before renaming it)."""
        if ".incomplete-" in name:
            return name.split(".incomplete-")[0] + ".incomplete"
        if name.startswith(".tmp") and len(name) == 10:
            if ("name:" + name) not in self.events:
                self._temps += 1
                self.events["name:" + name] = self._temps
            return f".tmp#{self.events['name:' + name]}"
        return name

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self._seen("line:" + line.split(" ")[0])

    def _poll(self) -> None:
        while self.proc.poll() is None:
            for folder in self._watch:
                try:
                    names = os.listdir(folder)
                except OSError:
                    continue
                for name in names:
                    self._seen("file:" + self._event_name(name))
            if self._kill and self.killed_at is None and self._kill[0] in self.events:
                due = self.events[self._kill[0]] + self._kill[1]
                now = time.perf_counter() - self.start
                if now >= due:
                    if self._action is None:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    else:
                        self._action()
                    self.killed_at = now
            time.sleep(0.0002)


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder``; baq_report.json also without its wall-time fields."""
    out = {}
    for path in sorted(folder.iterdir()):
        out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        if path.name == "README.md":
            text = "".join(
                line for line in path.read_text().splitlines(True) if not line.startswith(CARD_TIMING)
            )
            out[path.name + " (timing removed)"] = hashlib.sha256(text.encode()).hexdigest()
        if path.name == "baq_report.json":
            out[path.name + " (timing removed)"] = hashlib.sha256(
                json.dumps(strip_timing(json.loads(path.read_text())), sort_keys=True).encode()
            ).hexdigest()
    return out


def strip_timing(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def rounded(events: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in events.items() if k.startswith(("file:", "line:"))}


def differing(reference: dict[str, str], digest: dict[str, str]) -> list[str]:
    return sorted(k for k in set(reference) | set(digest) if reference.get(k) != digest.get(k))


def evidence(work: Path) -> dict[str, Any]:
    """What a killed run left behind: state files, temporary save folders, the output folder."""
    state = work / "state"
    names = sorted(os.listdir(state)) if state.exists() else []
    blocks_done = None
    if (state / "baq_resume.json").exists():
        blocks_done = json.loads((state / "baq_resume.json").read_text())["blocks_done"]
    return {
        "state_files": names,
        "blocks_done": blocks_done,
        "save_leftovers": sorted(n for n in os.listdir(work) if ".incomplete-" in n or ".old-" in n),
        "out_exists": (work / "out").exists(),
    }


def landed_in(ev: dict[str, Any], run: Run, n_blocks: int) -> str:
    """Where the kill landed, judged from what the run left and the events seen before it."""
    if any(n.endswith(".tmp") or n.startswith(".tmp") for n in ev["state_files"]):
        return "resume-state write"
    if ev["out_exists"] and not ev["save_leftovers"]:
        return "after the final save's rename (the folder is complete)"
    if ev["save_leftovers"] or "file:.out.incomplete" in run.events:
        return "final save"
    if ev["blocks_done"] is None:
        return "loading + calibration (before the first block's state)"
    if ev["blocks_done"] < n_blocks:
        return f"GPTQ (after {ev['blocks_done']} of {n_blocks} blocks)"
    return "after the last block, before the save (sanity check)"


def kill_moments(ref: Run, n: int, rng: random.Random, n_blocks: int) -> list[tuple[str, float]]:
    """``n`` (event, delay) pairs cycling over the four phases, delays from the reference timeline."""
    ev = ref.events
    first_block = ev["file:block_00000.safetensors.tmp"]
    blocks = [ev[f"file:block_{i:05d}.safetensors.tmp"] for i in range(n_blocks)]
    save_start = ev["file:.out.incomplete"]
    # safetensors' temporary files (while the data is written) and ours (while fsynced and renamed)
    writes = [k for k in ev if k.startswith("file:.tmp#") or k.endswith(".safetensors.tmp")]
    moments = []
    for i in range(n):
        phase = i % 4
        if phase == 0:  # loading the model, capturing the first block's inputs, its GPTQ
            moments.append(("line:quantizing", rng.uniform(0, first_block - ev["line:quantizing"])))
        elif phase == 1:  # GPTQ of a later block
            j = rng.randrange(n_blocks - 1)
            moments.append((f"file:block_{j:05d}.safetensors", rng.uniform(0, blocks[j + 1] - blocks[j])))
        elif phase == 2:  # while a state file is being written (it exists under its .tmp name)
            moments.append((rng.choice(sorted(writes)), rng.uniform(0, 0.0005)))
        else:  # the final save: from its temporary folder's appearance to the end of the run
            moments.append(("file:.out.incomplete", rng.uniform(0, 1.1 * (ev["file:out"] - save_start))))
    return moments


def run_kills(work: Path, model: Path, n_kills: int, seed: int) -> dict[str, Any]:
    out, state = work / "out", work / "state"
    cmd = quantize_command(model, out, state)
    watch = [work, state]
    ref = Run(cmd, watch)
    assert ref.rc == 0, "\n".join(ref.lines[-20:])
    n_blocks = sum(1 for k in ref.events if k.startswith("file:block_") and k.endswith(".tmp"))
    reference = folder_digest(out)
    shutil.move(out, work / "reference")
    shutil.rmtree(state)
    print(f"reference run: {ref.seconds:.1f} s, events {json.dumps(rounded(ref.events))}")
    trials = []
    for i, (event, delay) in enumerate(kill_moments(ref, n_kills, random.Random(seed), n_blocks)):
        killed = Run(cmd, watch, kill=(event, delay))
        ev = evidence(work)
        where = (
            landed_in(ev, killed, n_blocks)
            if killed.killed_at is not None
            else "not killed (run ended first)"
        )
        reruns = []
        while len(reruns) < 3:
            rerun = Run(cmd, watch)
            reruns.append(
                {"rc": rerun.rc, "seconds": round(rerun.seconds, 2), "stderr_tail": rerun.lines[-3:]}
            )
            if rerun.rc == 0:
                break
        digest = folder_digest(out) if out.exists() else {}
        differ = differing(reference, digest)
        leftovers = evidence(work)["save_leftovers"]
        trial = {
            "anchor": event,
            "delay_s": round(delay, 4),
            "killed_at_s": None if killed.killed_at is None else round(killed.killed_at, 3),
            "killed_rc": killed.rc,
            "landed_in": where,
            "left": ev,
            "reruns": reruns,
            "differing_files": differ,
            "identical": not [k for k in differ if k not in TIMED_FILES],
            "leftovers_after": leftovers,
        }
        trials.append(trial)
        rcs = [r["rc"] for r in reruns]
        print(
            f"kill {i + 1}/{n_kills}: {event} + {delay:.4f} s -> {where}; reruns {rcs}; differ {differ}",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
        for name in leftovers:
            shutil.rmtree(work / name, ignore_errors=True)
    return {
        "reference_seconds": round(ref.seconds, 2),
        "reference_events": rounded(ref.events),
        "reference_files": reference,
        "trials": trials,
    }


# ---------------------------------------------------------------------------------------------- disk full


def mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def fill(disk: Path) -> None:
    """Another writer takes all but 64 KiB of the disk (while the save is under way)."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler.bin", "wb") as f:
        f.write(b"\0" * max(free - (64 << 10), 0))


def run_disk_full(work: Path, model: Path, reference: dict[str, str]) -> dict[str, Any]:
    """--out on a small tmpfs: too small for the weights, for weights + tokenizer, or filled by another
    writer while the save runs; then a rerun on a tmpfs with space."""
    disk, state = work / "disk", work / "state"
    weights = (work / "reference" / "model.safetensors").stat().st_size
    total = sum(p.stat().st_size for p in (work / "reference").iterdir())
    cases = []
    for label, size, action in (
        ("tmpfs half the weights' size", weights // 2, None),
        ("tmpfs holds the weights, not the tokenizer", (weights + total) // 2, None),
        ("tmpfs with room, filled by another writer as the save starts", 2 * total, fill),
    ):
        mount_tmpfs(disk, size)
        try:
            cmd = quantize_command(model, disk / "out", state)
            kill = ("file:.out.incomplete", 0.0) if action else None
            run = Run(cmd, [disk], kill=kill, action=None if action is None else partial(action, disk))
            error = [line for line in run.lines if line.startswith("error:") or "Error" in line]
            left = sorted(n for n in os.listdir(disk) if n != "filler.bin")
            case = {"case": label, "tmpfs_bytes": size, "rc": run.rc, "error": error[-1:] or run.lines[-3:]}
            case["left_on_disk"] = left
        finally:
            subprocess.run(["umount", str(disk)], check=True)
        mount_tmpfs(disk, 4 * total)
        try:
            rerun = Run(quantize_command(model, disk / "out", state), [disk])
            case["rerun_rc"] = rerun.rc
            case["rerun_differing_files"] = differing(
                reference, folder_digest(disk / "out") if rerun.rc == 0 else {}
            )
        finally:
            subprocess.run(["umount", str(disk)], check=True)
        print(f"disk full ({label}): {case}", flush=True)
        cases.append(case)
    shutil.rmtree(state, ignore_errors=True)
    return {"weights_bytes": weights, "folder_bytes": total, "cases": cases}


# ---------------------------------------------------------------------------------------------- fuzz

# every FULL_EVERY-th case also goes through AutoModelForCausalLM.from_pretrained (the whole transformers
# path); the others through the packed-layer path it uses: header -> PackedLayout.from_shapes (checked
# against the model's shapes) -> safetensors load -> BaqLinear.from_tensors (validate)
FULL_EVERY = 10
CASE_SECONDS = 30.0  # a case running longer counts as a hang (its worker is killed and replaced)
NEW_FIELDS = ("checksum", "scale_v2", "zeros", "g_idx", "act_scale", "bits_header_v2")


def fuzz_source(folder: Path) -> None:
    """The fuzz test's checkpoint: one LLaMA block, in_features 40 and 45, groups of 5, act_order,
    attention biases, 0..8-bit columns; unquantized tensors in bfloat16 as baq_hf saves them."""
    import torch

    from baq_hf import BaqConfig
    from baq_hf.calibration import quantize_model
    from baq_hf.checkpoint import save_quantized
    from tests.test_fuzz_checkpoint import odd_llama

    torch.set_num_threads(1)
    model = odd_llama()
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    config = BaqConfig(bits=2.5, group_size=5, act_order=True, num_samples=4, seqlen=16)
    quantize_model(model, windows, config, progress=False)
    model.config.quantization_config = config
    save_quantized(model, folder)


def mutate_more(folder: Path, kind: str, rnd: random.Random) -> str:
    """Mutations beyond the fuzz test's: new (optional) tensors and edits of the header's metadata."""
    from safetensors.torch import load_file, save_file

    from tests.test_fuzz_checkpoint import read_raw, write_raw

    path = folder / "model.safetensors"
    if kind == "add_field":
        import torch

        tensors = load_file(str(path))
        layers = sorted({k.rpartition(".")[0] for k in tensors if k.endswith(".bits_header")})
        layer = rnd.choice([*layers, "model"])
        name = f"{layer}.{rnd.choice(NEW_FIELDS)}"
        dtype = rnd.choice([torch.float16, torch.int32, torch.uint8, torch.bfloat16])
        shape = rnd.choice([(), (0,), (7,), (4, 5), tuple(tensors[rnd.choice(sorted(tensors))].shape)])
        tensors[name] = torch.zeros(shape, dtype=dtype) if rnd.random() < 0.5 else torch.ones(shape).to(dtype)
        save_file(tensors, str(path), {"format": "pt"})
        return f"add {name} {dtype} {list(shape)}"
    header, data = read_raw(path)
    meta = header.get("__metadata__", {})
    edit = rnd.choice(["add", "format", "drop", "not a string", "not a dict"])
    if edit == "add":
        meta[rnd.choice(["baq_version", "checksum", "format_version", "x" * 300])] = str(rnd.randrange(100))
    elif edit == "format":
        meta["format"] = rnd.choice(["np", "tf", "flax", "mlx", ""])
    elif edit == "drop":
        header.pop("__metadata__", None)
    elif edit == "not a string":
        meta["format"] = rnd.choice([1, None, ["pt"]])
    if edit != "drop":
        header["__metadata__"] = meta if edit != "not a dict" else rnd.choice([[], "pt", 3])
    write_raw(path, header, data)
    return f"metadata {edit}"


def load_layers(folder: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The packed layers of the checkpoint, loaded and validated as the quantizer does, per layer."""
    from safetensors.torch import load_file

    from baq_hf import BaqLinear
    from baq_hf import format as fmt
    from baq_hf.quantizer import read_checkpoint_layout

    path = folder / "model.safetensors"
    layout = read_checkpoint_layout([str(path)])
    tensors = load_file(str(path))
    layers = {}
    for key, infos in layout.items():
        if key not in expected:
            raise ValueError(f"the checkpoint quantizes {key!r}, which this model does not have")
        fmt.WeightShape.from_shapes({t: i.shape for t, i in infos.items()}, key, expected[key])
        layers[key] = BaqLinear.from_tensors({t: tensors[f"{key}.{t}"] for t in infos}, key)
    return layers


def fuzz_case(i: int, seed: int, source: Path, scratch: Path, ref: dict[str, Any]) -> dict[str, Any]:
    """Mutate a copy of the source checkpoint and load it; classify what happened."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from baq_hf import BaqLinear
    from tests.test_fuzz_checkpoint import KINDS, mutate

    rnd = random.Random(seed * 1_000_003 + i)
    kind = rnd.choice([*KINDS, "add_field", "metadata"])
    folder = scratch / "case"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder)
    descs = []
    if rnd.random() < 0.5:  # first a mutation that keeps the file well-formed, so that both take effect
        descs.append(mutate(folder, rnd.choice(["flip_data", "randomize", "rename"]), rnd))
    descs.append(
        mutate_more(folder, kind, rnd) if kind in ("add_field", "metadata") else mutate(folder, kind, rnd)
    )
    full = i % FULL_EVERY == 0
    case: dict[str, Any] = {
        "i": i,
        "kind": kind,
        "mutation": "; ".join(descs),
        "path": "model" if full else "layer",
    }
    start = time.perf_counter()
    try:
        if full:
            model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
            layers = {n: m for n, m in model.named_modules() if isinstance(m, BaqLinear)}
            missing = sorted(info["missing_keys"])
        else:
            layers, missing = load_layers(folder, ref["shapes"]), []
            if sorted(layers) != sorted(ref["layers"]):  # a layer no longer packed: the model decides
                case["path"] = "model (a layer lost its bits_header)"
                full = True
                model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
                layers = {n: m for n, m in model.named_modules() if isinstance(m, BaqLinear)}
                missing = sorted(info["missing_keys"])
    except (ValueError, RuntimeError, OSError, SafetensorError) as exc:
        case["outcome"] = "clean error" if str(exc).strip() else "crash: error without a message"
        case["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    except Exception as exc:  # anything else is a crash of the loader
        case["outcome"] = f"crash: {type(exc).__name__}"
        case["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    else:
        try:
            changed = check_loaded(layers, ref, missing, model if full else None)
        except Exception as exc:  # a model that loaded but does not run: the worst outcome
            case["outcome"] = f"crash after loading: {type(exc).__name__}: {exc}"
            case["seconds"] = round(time.perf_counter() - start, 4)
            return case
        case["changed"] = changed
        # value edits of valid tensors (code words, ranges, norms) pass any check short of a checksum
        touched = {d.split(" ", 3)[-1] for d in descs if d.startswith(("flip bits in ", "randomize "))}
        if not changed:
            case["outcome"] = "loaded, identical"
        elif all(c.split(" ")[0] in touched for c in changed if c != "logits not finite"):
            case["outcome"] = "loaded, differs: values of flipped/randomized tensors"
        else:
            case["outcome"] = "loaded, differs: UNEXPLAINED (the loader missed a change)"
    case["seconds"] = round(time.perf_counter() - start, 4)
    return case


class WrongModel(Exception):
    """A checkpoint loaded into a model that is broken (wrong layers, shapes or non-finite weights)."""


def check_loaded(layers: dict[str, Any], ref: dict[str, Any], missing: list[str], model: Any) -> list[str]:
    """The tensors in which a loaded checkpoint differs from the source; raises if it does not run."""
    import torch

    changed = [f"{name} not packed" for name in ref["layers"] if name not in layers]
    if set(layers) - set(ref["layers"]):
        raise WrongModel(f"loaded layers {sorted(layers)} are not the source's")
    for name, layer in layers.items():
        w = layer.dequantize()
        if w.shape != ref["layers"][name]["w"].shape or not torch.isfinite(w).all():
            raise WrongModel(f"{name} dequantizes to a wrong shape or non-finite weights")
        y = layer(torch.ones(2, layer.in_features, dtype=w.dtype))
        if y.shape != (2, layer.out_features):
            raise WrongModel(f"{name} gives output of shape {tuple(y.shape)}")
        for tensor, t in layer.state_dict().items():
            r = ref["layers"][name]["tensors"][tensor]
            if t.dtype != r.dtype or t.shape != r.shape or not torch.equal(t, r):
                changed.append(f"{name}.{tensor}")
    if model is not None:
        state = model.state_dict()
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3, 4]])).logits
        if not torch.isfinite(logits).all() and torch.isfinite(ref["logits"]).all():
            changed.append("logits not finite")
        for key, r in ref["unquantized"].items():
            if key in state and (state[key].shape != r.shape or not torch.equal(state[key].to(r.dtype), r)):
                changed.append(key + (" (reported MISSING)" if key in missing else ""))
    return sorted(changed)


def fuzz_reference(source: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from baq_hf import BaqLinear
    from baq_hf import format as fmt

    model = AutoModelForCausalLM.from_pretrained(source)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BaqLinear)}
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    baq_keys = {f"{n}.{t}" for n, m in layers.items() for t in m.state_dict()}
    return {
        "layers": {n: {"w": m.dequantize(), "tensors": dict(m.state_dict())} for n, m in layers.items()},
        "shapes": {
            n: fmt.ModuleShape(m.out_features, m.in_features, m.bias is not None) for n, m in layers.items()
        },
        "unquantized": {k: v for k, v in model.state_dict().items() if k not in baq_keys},
        "logits": logits,
    }


def fuzz_worker(conn: Any, source: str, scratch: str, seed: int) -> None:
    """Run the cases the parent sends, one at a time, answering each with its record."""
    import logging

    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    os.environ["TQDM_DISABLE"] = "1"
    ref = fuzz_reference(Path(source))
    conn.send("ready")
    while (i := conn.recv()) is not None:
        conn.send(fuzz_case(i, seed, Path(source), Path(scratch), ref))


def run_fuzz(work: Path, n_cases: int, seed: int, n_workers: int) -> dict[str, Any]:
    """``n_cases`` mutated checkpoints over ``n_workers`` processes, each case under a watchdog."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    source = work / "fuzz-source"
    if not source.exists():
        fuzz_source(source)
    ctx = mp.get_context("spawn")
    pending = list(range(n_cases))[::-1]
    records: list[dict[str, Any]] = []
    workers: dict[Any, dict[str, Any]] = {}

    def spawn(k: int) -> None:
        scratch = work / f"fuzz-worker-{k}-{len(records)}"
        scratch.mkdir(exist_ok=True)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=fuzz_worker, args=(child, str(source), str(scratch), seed), daemon=True)
        proc.start()
        if parent.poll(300) and parent.recv() == "ready":
            workers[parent] = {"proc": proc, "k": k, "case": None, "since": 0.0, "scratch": scratch}
            feed(parent)

    def feed(conn: Any) -> None:
        w = workers[conn]
        w["case"] = pending.pop() if pending else None
        w["since"] = time.perf_counter()
        conn.send(w["case"])

    def replace(conn: Any, outcome: str) -> None:
        w = workers.pop(conn)
        w["proc"].kill()
        w["proc"].join()
        records.append({"i": w["case"], "outcome": outcome, "exitcode": w["proc"].exitcode})
        shutil.rmtree(w["scratch"], ignore_errors=True)
        spawn(w["k"])

    start = time.perf_counter()
    for k in range(n_workers):
        spawn(k)
    while workers:
        for conn in wait(list(workers), timeout=1.0):
            try:
                rec = conn.recv()
            except EOFError:
                replace(conn, "crash: worker process died")
                continue
            records.append(rec)
            if len(records) % 1000 == 0:
                print(
                    f"fuzz: {len(records)}/{n_cases} cases, {time.perf_counter() - start:.0f} s", flush=True
                )
            if workers[conn]["case"] is not None and pending:
                feed(conn)
            else:
                conn.send(None)
                w = workers.pop(conn)
                w["proc"].join()
                shutil.rmtree(w["scratch"], ignore_errors=True)
        for conn, w in list(workers.items()):
            if w["case"] is not None and time.perf_counter() - w["since"] > CASE_SECONDS:
                replace(conn, "hang")
    return summarize_fuzz(records, time.perf_counter() - start, n_workers)


def normalized(error: str) -> str:
    """An error message with the case's folder and the numbers taken out, on one line."""
    error = re.sub(r"/\S*/case/", "<case>/", " ".join(error.split()))
    return re.sub(r"\d+", "N", error)


def summarize_fuzz(records: list[dict[str, Any]], seconds: float, n_workers: int) -> dict[str, Any]:
    from collections import Counter

    def bucket(rec: dict[str, Any]) -> str:
        o = rec["outcome"]
        return o

    times = sorted(r.get("seconds", 0.0) for r in records)
    errors = Counter(normalized(r["error"])[:130] for r in records if "error" in r)
    return {
        "cases": len(records),
        "workers": n_workers,
        "wall_seconds": round(seconds, 1),
        "outcomes": dict(Counter(bucket(r) for r in records).most_common()),
        "by_kind": {
            kind: dict(Counter(bucket(r) for r in records if r.get("kind") == kind).most_common())
            for kind in sorted({r.get("kind", "?") for r in records})
        },
        "by_path": dict(Counter(r.get("path", "?") for r in records)),
        "differs": dict(
            Counter(
                ", ".join(c.split("layers.0.")[-1] for c in r["changed"])
                for r in records
                if r["outcome"].startswith("loaded, differs")
            )
        ),
        "case_seconds": {"median": times[len(times) // 2], "max": times[-1]} if times else {},
        "top_errors": dict(errors.most_common(25)),
        "crashes": [
            r for r in records if r["outcome"].startswith(("crash", "hang", "loaded, differs: UNEX"))
        ],
        "differs_examples": [r for r in records if r["outcome"].startswith("loaded, differs")][:40],
    }


# ---------------------------------------------------------------------------------------------- main


KILLS_TEXT = """
Uninterrupted run: {seconds} s. Each kill is `anchor + delay` (anchor: a log line or a file seen
appearing; `.tmp#k`: the k-th temporary file safetensors wrote); *landed in* is judged from what the
killed run left behind. Then the same command is rerun until it exits 0 and its folder is compared file
by file (sha256) with the uninterrupted run's. The only bytes that differ are wall-time measurements:
`seconds`/`timing` in baq_report.json and the model card's `| calibration time |` row (a resumed run
times itself); those two files are also compared with those fields removed, and must match.
"""
FUZZ_TEXT = """
{workers} worker processes, {wall} s; each case under a {limit:.0f} s watchdog (median {median:.1f} ms,
max {max:.2f} s). Mutations: tests/test_fuzz_checkpoint.py's (bit flips in data and header, truncation,
dtype and shape edits, dropped, renamed and swapped tensors, random bytes), new tensors beside a layer's
(`add_field`) and `__metadata__` edits; half the cases first get a second, well-formed mutation. Every
{every}th case goes through `AutoModelForCausalLM.from_pretrained` and a forward pass, the others through
the packed-layer path the quantizer uses (header, shapes checked against the model,
`BaqLinear.from_tensors` with `validate`, dequantize, forward). A loaded model is compared tensor by
tensor with the source.
"""


def prose(text: str) -> str:
    return " ".join(text.split())


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """docs/results/faults.md: the three experiments' tables."""
    lines = [
        "# Faults: SIGKILLed runs, full disks, fuzzed checkpoints",
        "",
        f"- command: `{results['command']}`",
        f"- machine: {results['machine_before']} before, {results['machine_after']} after "
        f"({results['wall_seconds']:.0f} s in all); {results['versions']}",
        f"- CLI settings: `{' '.join(results['settings'])}` on a random 6-block LLaMA (hidden 128, "
        "SmolLM2 tokenizer), `--resume DIR --overwrite`; calibration text: the C4 sample shipped with baq_hf",
        "",
    ]
    if "kills" in results:
        k = results["kills"]
        ok = sum(
            t["identical"] and t["reruns"][-1]["rc"] == 0 and not t["leftovers_after"] for t in k["trials"]
        )
        lines += [
            f"## SIGKILL: {ok}/{len(k['trials'])} killed runs resumed to the identical checkpoint",
            "",
            prose(KILLS_TEXT).format(seconds=k["reference_seconds"]),
            "",
            "| # | anchor + delay | landed in | left behind | reruns (rc) | files differing | identical |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, t in enumerate(k["trials"], 1):
            left = t["left"]
            state = [f for f in left["state_files"] if f.endswith("tmp") or f.startswith(".tmp")]
            what = ", ".join(
                filter(
                    None,
                    [
                        f"{left['blocks_done']} blocks in state" if left["blocks_done"] is not None else "",
                        ", ".join(state),
                        ", ".join(left["save_leftovers"]),
                        "out/" if left["out_exists"] else "",
                    ],
                )
            )
            differ = ", ".join(t["differing_files"]) or "none"
            rcs = " ".join(str(r["rc"]) for r in t["reruns"])
            lines.append(
                f"| {n} | `{t['anchor']}` + {t['delay_s'] * 1000:.1f} ms | {t['landed_in']} | "
                f"{what or 'nothing'} | {rcs} | {differ} | {'yes' if t['identical'] else 'NO'} |"
            )
        lines.append("")
    if "disk_full" in results:
        d = results["disk_full"]
        lines += [
            "## Disk full: `--out` on a small tmpfs",
            "",
            f"Weights {d['weights_bytes'] / 2**20:.1f} MiB, whole folder {d['folder_bytes'] / 2**20:.1f} MiB."
            " "
            "After each failure the tmpfs is listed (anything but the filler file would be a leftover), then "
            "the same command runs on a tmpfs with room.",
            "",
            "| case | tmpfs | exit | error | left on the tmpfs | rerun with space |",
            "|---|---|---|---|---|---|",
        ]
        for c in d["cases"]:
            rerun = f"exit {c['rerun_rc']}, differs: {', '.join(c['rerun_differing_files']) or 'none'}"
            lines.append(
                f"| {c['case']} | {c['tmpfs_bytes'] / 2**20:.1f} MiB | {c['rc']} | `{' '.join(c['error'])}`"
                f" | {', '.join(c['left_on_disk']) or 'nothing'} | {rerun} |"
            )
        lines.append("")
    if "fuzz" in results:
        f = results["fuzz"]
        lines += [
            f"## Loader over {f['cases']} fuzzed checkpoints: {len(f['crashes'])} crashes, hangs or "
            "unexplained changes",
            "",
            prose(FUZZ_TEXT).format(
                workers=f["workers"],
                wall=f["wall_seconds"],
                limit=CASE_SECONDS,
                median=f["case_seconds"].get("median", 0) * 1000,
                max=f["case_seconds"].get("max", 0),
                every=FULL_EVERY,
            ),
            "",
            "| outcome | cases |",
            "|---|---|",
            *[f"| {o} | {n} |" for o, n in f["outcomes"].items()],
            "",
            "| mutation | " + " | ".join(sorted({o for v in f["by_kind"].values() for o in v})) + " |",
            "|---|" + "---|" * len({o for v in f["by_kind"].values() for o in v}),
        ]
        outcomes = sorted({o for v in f["by_kind"].values() for o in v})
        for kind, counts in f["by_kind"].items():
            lines.append(f"| {kind} | " + " | ".join(str(counts.get(o, 0)) for o in outcomes) + " |")
        lines += ["", "Tensors that differed in the models that loaded but differ from the source:", ""]
        lines += [f"- {what}: {n}" for what, n in sorted(f["differs"].items(), key=lambda x: -x[1])[:20]]
        lines += ["", "Most frequent errors (path and numbers vary per case):", ""]
        lines += [f"- `{e}` ({n})" for e, n in list(f["top_errors"].items())[:15]]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def machine() -> str:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--fuzz", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="fuzz worker processes")
    p.add_argument(
        "--no-write", dest="write", action="store_false", help="do not write docs/results/faults.*"
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["kills", "disk", "fuzz"])
    p.add_argument("--work", type=Path, help="working folder (default: a fresh temporary one)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="baq-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not model.exists():
        build_model(model)
    import safetensors
    import torch
    import transformers

    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python benchmarks/faults.py " + " ".join(sys.argv[1:]),
        "machine_before": machine(),
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"safetensors {safetensors.__version__}",
        "settings": CLI_SETTINGS,
        "seed": args.seed,
    }
    if "kills" not in args.skip:
        results["kills"] = run_kills(work, model, args.kills, args.seed)
    if "disk" not in args.skip:
        results["disk_full"] = run_disk_full(work, model, results.get("kills", {}).get("reference_files", {}))
    if "fuzz" not in args.skip:
        results["fuzz"] = run_fuzz(work, args.fuzz, args.seed, args.workers)
        print(json.dumps({k: v for k, v in results["fuzz"].items() if k != "crashes"}, indent=1))
        print(f"crashes: {len(results['fuzz']['crashes'])}", results["fuzz"]["crashes"][:5])
    results["machine_after"] = machine()
    results["wall_seconds"] = time.perf_counter() - started
    if args.write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "faults.json").write_text(
            json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8"
        )
        write_markdown(results, RESULTS / "faults.md")
        print(f"wrote {RESULTS / 'faults.md'} and faults.json")


if __name__ == "__main__":
    main()
