"""Run the README's main command as a newcomer would and record its time, size and perplexities.

    python benchmarks/readme_command.py --note "5 agents shared the 2 cores"

The command is the ``baq-hf ...`` part of the bash block after ``<!-- main-command ... -->`` in
README.md (the install steps before it are not timed). It runs in a fresh temporary folder with an
empty model cache: first the one-time conversion of the embedded model (what the first ``baq-hf``
call does on a new machine), timed on its own, then the command itself. Results go to
docs/results/readme_command.json and .md, and the measured paragraph of docs/quickstart.md (between
the ``readme-command`` markers) is rewritten from them: after changing the README command, rerunning
this script is all that keeps the documentation true.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from baq_hf.report import human_bytes, summarize

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
QUICKSTART = ROOT / "docs" / "quickstart.md"
START, END = "<!-- readme-command:start", "<!-- readme-command:end -->"


def readme_command() -> str:
    """The ``baq-hf ...`` part of the README's main command block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- main-command[^\n]*-->\n```bash\n(.*?)```", text, flags=re.S)
    if match is None:
        raise SystemExit("README.md has no bash block after a <!-- main-command ... --> line")
    parts = [p.strip() for p in match[1].replace("\\\n", " ").split("&&")]
    commands = [p for p in parts if p.startswith("baq-hf ")]
    if len(commands) != 1:
        raise SystemExit(f"expected one baq-hf command in the README's main block, found {commands}")
    return commands[0]


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return seconds, proc.stdout


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def paragraph(r: dict) -> str:
    """The measured paragraph of docs/quickstart.md."""
    ppl = r["wikitext2"]
    return "\n".join(
        [
            f"{START} (written by benchmarks/readme_command.py from docs/results/readme_command.json) -->",
            f"Measured on {r['machine']} ({r['date']}; {r['note']}; load average {r['load_before']:.1f} "
            f"before the run, {r['load_after']:.1f} after):",
            "",
            f"- `{r['command']}` took **{minutes(r['command_seconds'])}** (peak memory "
            f"{r['peak_rss_gib']:.2f} GiB), after **{minutes(r['convert_seconds'])}** for the one-time "
            "conversion of the embedded model that the first `baq-hf` call on a new machine does.",
            f"- It printed WikiText-2 perplexity **{ppl['fp']:.2f}** for the float model and "
            f"**{ppl['baq']:.2f}** for the quantized one (first {ppl['windows']} windows of {ppl['seqlen']} "
            f"tokens), **{r['code_bits']:.3f} code bits** and **{r['effective_bits']:.3f} effective bits** "
            "per quantized weight.",
            f"- The saved weights take **{human_bytes(r['safetensors_bytes'])}** on disk, "
            f"**{r['ratio']:.2f}x** the 16-bit original ({human_bytes(r['original_16bit_bytes'])}); the "
            f"folder with tokenizer, report and model card takes {human_bytes(r['folder_bytes'])}.",
            END,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--note", default="an otherwise idle machine", help="what else ran on the machine")
    args = parser.parse_args()
    command = readme_command()
    baq_hf_cli = [sys.executable, "-m", "baq_hf.cli"]
    with tempfile.TemporaryDirectory(prefix="baq_hf-readme-") as tmp:
        folder = Path(tmp)
        env = dict(os.environ, BAQ_HF_CACHE=str(folder / "cache"))
        env.pop("BAQ_HF_QUICK_TEST", None)
        load_before = os.getloadavg()[0]
        convert = [sys.executable, "-c", "from baq_hf.models import smollm2_path; smollm2_path()"]
        convert_seconds, _ = timed(convert, folder, env)
        command_seconds, stdout = timed([*baq_hf_cli, *shlex.split(command)[1:]], folder, env)
        load_after = os.getloadavg()[0]
        out = folder / shlex.split(command)[shlex.split(command).index("--out") + 1]
        summary = summarize(out)
        ppl = summary.eval["wikitext2"]
        result = {
            "command": command,
            "date": _dt.date.today().isoformat(),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
            "note": args.note,
            "load_before": load_before,
            "load_after": load_after,
            "convert_seconds": convert_seconds,
            "command_seconds": command_seconds,
            # the largest resident set of the two child processes, in KiB on Linux
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
            "wikitext2": ppl,
            "code_bits": summary.code_bits,
            "effective_bits": summary.effective_bits,
            "safetensors_bytes": summary.size.safetensors_bytes,
            "original_16bit_bytes": summary.size.original_16bit_bytes,
            "ratio": summary.size.ratio,
            "folder_bytes": sum(summary.files.values()),
            "stdout": stdout,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "readme_command.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    text = paragraph(result)
    (RESULTS / "readme_command.md").write_text(
        "# The README's main command, measured\n\n"
        + text.split("\n", 1)[1].rsplit("\n", 1)[0]
        + f"\n\nIts output:\n\n```\n{stdout.strip()}\n```\n\nCommand: `python benchmarks/readme_command.py "
        f"--note {shlex.quote(args.note)}`.\n",
        encoding="utf-8",
    )
    quickstart = QUICKSTART.read_text(encoding="utf-8")
    begin, end = quickstart.index(START), quickstart.index(END) + len(END)
    QUICKSTART.write_text(quickstart[:begin] + text + quickstart[end:], encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
