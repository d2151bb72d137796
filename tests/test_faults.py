"""Real faults, CI-sized (benchmarks/faults.py runs them at scale): SIGKILLed CLI runs, a full tmpfs,
leftovers of killed saves and killed resume-state writes.

The kill tests run the CLI as a subprocess and SIGKILL it when a file it writes appears (no hook in the
product); the disk-full test mounts a tmpfs and is skipped unless root may mount one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from functools import partial
from pathlib import Path

import pytest

import baq_hf.checkpoint as ckpt
from baq_hf.checkpoint import INCOMPLETE_MARKER, save_quantized

from .test_cli import save_tiny_with_tokenizer
from .test_reliability import assert_reload_exact, assert_same_state, leftovers, quantize, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import faults  # benchmarks/faults.py: the harness that watches and kills the CLI

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A tiny float model folder and the folder and digest of one uninterrupted quantize run."""
    work = tmp_path_factory.mktemp("faults")
    model = save_tiny_with_tokenizer(work / "model")
    cmd = faults.quantize_command(model, work / "out", work / "state")
    ref = faults.Run(cmd, [work, work / "state"])
    assert ref.rc == 0, "\n".join(ref.lines[-20:])
    digest = faults.folder_digest(work / "out")
    (work / "out").rename(work / "reference")
    subprocess.run(["rm", "-rf", str(work / "state")], check=True)
    return work, cmd, digest


@pytest.mark.parametrize(
    "anchor, where",
    [
        ("file:block_00000.safetensors", "GPTQ of block 1"),
        # a kill inside a temporary safetensors file (".tmp#2") is in benchmarks/faults.py only: the file
        # lives for milliseconds, so a polling watcher misses it on a loaded machine (a flaky CI case)
        ("file:.out.incomplete", "the final save"),
    ],
)
def test_sigkilled_cli_run_resumes_to_the_identical_folder(cli_run, anchor, where):
    work, cmd, reference = cli_run
    killed = faults.Run(cmd, [work, work / "state"], kill=(anchor, 0.0))
    assert killed.killed_at is not None and killed.rc == -9, f"not killed in {where}"
    rerun = faults.Run(cmd, [work, work / "state"])
    assert rerun.rc == 0, "\n".join(rerun.lines[-20:])
    differ = faults.differing(reference, faults.folder_digest(work / "out"))
    # only wall-time fields may differ (baq_report.json's seconds, the card's calibration time row)
    assert set(differ) <= set(faults.TIMED_FILES), differ
    assert not faults.evidence(work)["save_leftovers"]
    assert not [n for n in os.listdir(work / "state") if "tmp" in n]
    subprocess.run(["rm", "-rf", str(work / "out"), str(work / "state")], check=True)


def _can_mount(path: Path) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True)
    if ok.returncode == 0:
        subprocess.run(["umount", str(path)], check=True)
    return ok.returncode == 0


def test_full_tmpfs_names_the_disk_and_leaves_nothing(cli_run):
    work, _, reference = cli_run
    disk = work / "disk"
    if not _can_mount(disk):
        pytest.skip("needs root and permission to mount a tmpfs")
    weights = (work / "reference" / "model.safetensors").stat().st_size
    cmd = faults.quantize_command(work / "model", disk / "out", work / "state")
    for size, action in ((weights // 2, None), (8 * weights, faults.fill)):  # too small / filled mid-save
        faults.mount_tmpfs(disk, size)
        try:
            kill = ("file:.out.incomplete", 0.0) if action else None
            run = faults.Run(cmd, [disk], kill=kill, action=action and partial(action, disk))
            assert run.rc == 1, "\n".join(run.lines[-20:])
            holding = f"No space left on the disk holding {disk / 'out'} (mounted at {disk}, tmpfs)"
            assert run.lines[-1].startswith(f"error: [Errno 28] {holding}: the save needs about"), run.lines[
                -1
            ]
            assert "MiB (weights and tokenizer)" in run.lines[-1]
            assert sorted(set(os.listdir(disk)) - {"filler.bin"}) == []
        finally:
            subprocess.run(["umount", str(disk)], check=True)
    faults.mount_tmpfs(disk, 8 * weights)
    try:
        assert faults.Run(cmd, [disk]).rc == 0
        assert set(faults.differing(reference, faults.folder_digest(disk / "out"))) <= set(faults.TIMED_FILES)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
        subprocess.run(["rm", "-rf", str(work / "state")], check=True)


# ----------------------------------------------------------------------------------------------
# in-process: what killed processes leave behind


@pytest.fixture(scope="module")
def quantized_llama():
    model = tiny_model("llama")
    quantize(model)
    return model


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftover(parent: Path, name: str, kind: str, pid: int) -> Path:
    path = parent / f".{name}.{kind}-{ckpt._host()}-{pid}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"half")
    return path


def test_a_killed_saves_temporary_folder_is_removed_by_the_next_save(quantized_llama, tmp_path):
    left = leftover(tmp_path, "q", "incomplete", dead_pid())
    (left / INCOMPLETE_MARKER).write_text("")
    live = leftover(tmp_path, "q", "incomplete", os.getpid())  # a save still running: kept
    save_quantized(quantized_llama, tmp_path / "q")
    assert leftovers(tmp_path) == [live.name]
    assert_reload_exact(quantized_llama, tmp_path / "q")


def test_a_folder_set_aside_by_a_killed_save_is_put_back(quantized_llama, tmp_path):
    """Killed between renaming the old folder aside and renaming the new one in: the old one returns."""
    old = save_quantized(quantized_llama, tmp_path / "old")
    aside = tmp_path / f".q.old-{ckpt._host()}-{dead_pid()}-{uuid.uuid4().hex[:8]}"
    old.rename(aside)
    ckpt._remove_stale_saves(tmp_path / "q")
    assert leftovers(tmp_path) == [] and (tmp_path / "q" / "model.safetensors").exists()
    assert_reload_exact(quantized_llama, tmp_path / "q")


def test_disk_full_while_writing_names_the_disk_and_the_space(quantized_llama, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    def full(tensors, filename, metadata=None):  # as safetensors' Rust writer reports it
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mu, "safe_save_file", full)
    with pytest.raises(
        OSError, match=r"No space left on the disk holding .*q \(mounted at /.*\): the save needs about"
    ):
        save_quantized(quantized_llama, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_a_save_larger_than_the_free_space_is_refused_before_writing(quantized_llama, tmp_path, monkeypatch):
    usage = type("Usage", (), {"free": 1000, "total": 10_000, "used": 9000})
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(
        OSError, match=r"needs about 0\.\d MiB \(weights and tokenizer\) and 0\.0 MiB were free"
    ):
        save_quantized(quantized_llama, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name", [".tmpAb12Cd", "block_00000.safetensors.tmp", "hidden_00001.safetensors.tmp"]
)
def test_temp_files_of_a_killed_state_write_do_not_block_the_rerun(tmp_path, name):
    """A SIGKILL while safetensors writes block 0 leaves its temporary file (and nothing else)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / name).write_bytes(b"\0" * 100)
    reference, resumed = tiny_model("llama"), tiny_model("llama")
    quantize(reference)
    quantize(resumed, resume_dir=str(state))
    assert not (state / name).exists()
    assert_same_state(reference, resumed)


def test_fuzzed_checkpoints_never_crash_or_hang(tmp_path):
    """A few hundred of the benchmark's fuzz cases, in a worker process under its watchdog."""
    summary = faults.run_fuzz(tmp_path, 300, seed=1, n_workers=1)
    assert summary["cases"] == 300 and summary["crashes"] == [], summary["crashes"][:3]
    assert summary["outcomes"]["clean error"] > 200 and summary["outcomes"].get("loaded, identical", 0) > 0
    assert summary["by_path"].get("model", 0) >= 30  # every 10th case through from_pretrained


@pytest.mark.parametrize("tensor, dtype", [("group_index", "F32"), ("weight", "F32"), ("range_min", "I16")])
def test_a_retyped_tensor_of_the_same_size_is_refused(tmp_path, tensor, dtype):
    """Found by the fuzz benchmark: group_index retyped I32 -> F32 in the header (same bytes) loaded as
    zeros, since transformers casts a float tensor to the buffer's int dtype: a silent wrong model."""
    from transformers import AutoModelForCausalLM

    from .test_fuzz_checkpoint import read_raw, write_raw

    source = tmp_path / "source"
    faults.fuzz_source(source)
    header, data = read_raw(source / "model.safetensors")
    header[f"model.layers.0.self_attn.k_proj.{tensor}"]["dtype"] = dtype
    write_raw(source / "model.safetensors", header, data)
    with pytest.raises(ValueError, match=rf"k_proj': {tensor} has dtype torch\.\w+, expected torch\."):
        AutoModelForCausalLM.from_pretrained(source)
