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


# ---------------------------------------------------------------------------------------------- main


def machine() -> str:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--fuzz", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=["kills", "disk", "fuzz"])
    p.add_argument("--work", type=Path, help="working folder (default: a fresh temporary one)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="baq-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not model.exists():
        build_model(model)
    results: dict[str, Any] = {"machine_before": machine(), "settings": CLI_SETTINGS, "seed": args.seed}
    if "kills" not in args.skip:
        results["kills"] = run_kills(work, model, args.kills, args.seed)
    if "disk" not in args.skip:
        results["disk_full"] = run_disk_full(work, model, results.get("kills", {}).get("reference_files", {}))
    results["machine_after"] = machine()
    print(json.dumps(results, indent=1)[:3000])


if __name__ == "__main__":
    main()
