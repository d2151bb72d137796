"""The documentation runs: every code block and command of README.md and docs/*.md, and examples/*.py.

Collected: every ```python block, and every ``baq-hf ...`` command of the ```bash blocks (the other
shell lines install packages or run this suite, and are not run here). The blocks of one document run
in document order in one Python namespace and one temporary folder outside the repository, as a
reader would run them: later blocks may use what earlier ones made. ``baq-hf`` runs as
``python -m baq_hf.cli`` with this interpreter and this checkout's package. examples/*.py run as
scripts in a temporary folder too, with their smallest settings.

What runs is the text as written. The one concession to CI time is ``BAQ_HF_QUICK_TEST=1``, which
baq_hf honours by cutting calibration and evaluation to a few short windows (README.md says so);
the embedded SmolLM2-135M is quantized for real, only with less data. A block that cannot run here
(it needs a GPU, the Hub, or a model of your own) carries ``<!-- skip-test: reason -->`` on the line
before its fence and is reported as skipped with that reason.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import baq_hf
from baq_hf.data import QUICK_TEST_ENV

from .test_cli import save_tiny_with_tokenizer
from .test_data_eval_models import require_smollm2

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = ROOT / "examples"
# the folder that holds the baq_hf package under test, for the subprocesses
PACKAGE_PARENT = str(Path(baq_hf.__file__).resolve().parents[1])

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SKIP = re.compile(r"<!--\s*skip-test:\s*(.+?)\s*-->")
COMMAND_TIMEOUT = 900


@dataclass
class Block:
    """One runnable piece of a document: a python block, or one baq-hf command of a bash block."""

    doc: Path
    line: int
    kind: str  # "python" or "command"
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def shell_commands(script: str) -> list[str]:
    """The ``baq-hf ...`` commands of a shell block: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", script)
    commands = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        commands += [part.strip() for part in re.split(r"&&|;", line) if part.strip().startswith("baq-hf ")]
    return commands


def collect(doc: Path) -> list[Block]:
    text = doc.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        lang, code = match[1], match[2]
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rpartition("\n")[2]
        marker = SKIP.search(before)
        skip = marker[1] if marker else None
        if lang == "python":
            blocks.append(Block(doc, line, "python", code, skip))
        elif lang in ("bash", "sh", "shell", "console"):
            blocks += [Block(doc, line, "command", command, skip) for command in shell_commands(code)]
    return blocks


BLOCKS = [block for doc in DOCS for block in collect(doc)]


def subprocess_env() -> dict[str, str]:
    # one thread: GPTQ's column loop is many small operations, which threads only slow down (see the
    # single_thread fixture in conftest.py); this changes the speed, not what runs
    env = dict(os.environ, **{QUICK_TEST_ENV: "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_PARENT, env.get("PYTHONPATH")]))
    return env


def run_command(args: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        args, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    )
    if proc.returncode != 0:
        pytest.fail(f"{what} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@dataclass
class DocumentRun:
    """The state a reader builds up while running one document's blocks in order."""

    folder: Path
    namespace: dict[str, Any] = field(default_factory=lambda: {"__name__": "__main__"})
    done: int = 0  # blocks of the document run so far (run or skipped)
    failed: str | None = None


@pytest.fixture(scope="session")
def document_runs(tmp_path_factory) -> dict[Path, DocumentRun]:
    runs: dict[Path, DocumentRun] = {}
    for doc in DOCS:
        folder = tmp_path_factory.mktemp(f"docs-{doc.stem}")
        assert not folder.resolve().is_relative_to(ROOT)
        runs[doc] = DocumentRun(folder)
    return runs


def run_block(block: Block, run: DocumentRun) -> None:
    if block.kind == "python":
        exec(compile(block.code, block.id, "exec"), run.namespace)  # the documentation's own code
    else:
        args = shlex.split(block.code)
        run_command(
            [sys.executable, "-m", "baq_hf.cli", *args[1:]], run.folder, f"`{block.code}` ({block.id})"
        )


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.id}-{b.kind}" for b in BLOCKS])
def test_documentation_block_runs_as_written(block: Block, document_runs, monkeypatch):
    if block.skip:
        pytest.skip(block.skip)
    require_smollm2()
    run = document_runs[block.doc]
    monkeypatch.chdir(run.folder)
    monkeypatch.setenv(QUICK_TEST_ENV, "1")
    own = [b for b in BLOCKS if b.doc == block.doc]
    for earlier in own[run.done : own.index(block) + 1]:  # what a reader ran before this block
        if run.failed:
            pytest.fail(f"an earlier block of {block.doc.name} failed: {run.failed}")
        if earlier.skip is None:
            try:
                run_block(earlier, run)
            except BaseException as exc:
                run.failed = f"{earlier.id}: {type(exc).__name__}: {exc}"
                raise
        run.done += 1
    if all(b.skip for b in own[run.done :]):
        run.namespace.clear()  # nothing of the document is left to run: free its models


def test_every_document_block_is_collected():
    """The collector sees the blocks the documentation has (a renamed fence would silently drop one)."""
    kinds = {(b.doc.name, b.kind) for b in BLOCKS}
    assert ("README.md", "python") in kinds and ("README.md", "command") in kinds
    assert ("quickstart.md", "python") in kinds and ("quickstart.md", "command") in kinds
    main = [b for b in BLOCKS if b.doc.name == "README.md" and b.kind == "command"]
    assert main[0].code.startswith("baq-hf quantize smollm2-135m ")  # the install line is not run
    assert all(b.skip for b in BLOCKS if "your-name/" in b.code or "path/to/" in b.code)


# ---------------------------------------------------------------------------------------------- examples

# Each example with its smallest settings; they run in order in one folder (pipeline_usage reuses the
# model load_and_generate saved).
EXAMPLE_RUNS = {
    "load_and_generate.py": ["--max-new-tokens", "2"],
    "pipeline_usage.py": ["--max-new-tokens", "2"],
    "quantize_and_evaluate.py": ["--eval-windows", "1"],
    "quantize_and_push.py": ["your-name/smollm2-baq", "--dry-run"],  # --dry-run: saves, uploads nothing
}


def test_every_example_has_a_run():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXAMPLE_RUNS)


@pytest.fixture(scope="session")
def examples_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("examples")


@pytest.mark.slow
@pytest.mark.parametrize("script", list(EXAMPLE_RUNS))
def test_example_runs(script, examples_folder):
    require_smollm2()
    args = [sys.executable, str(EXAMPLES / script), *EXAMPLE_RUNS[script]]
    run_command(args, examples_folder, f"examples/{script}")


# ---------------------------------------------------------------------------------------------- the CLI


def test_cli_runs_from_a_folder_outside_the_repository(tmp_path):
    """Quantize, evaluate and inspect from a temporary folder: nothing relies on the checkout's folders."""
    model = save_tiny_with_tokenizer(tmp_path / "fp")
    cli = [sys.executable, "-m", "baq_hf.cli"]
    assert not tmp_path.resolve().is_relative_to(ROOT)
    quantize = f"quantize {model} --bits 2.5 --num-samples 4 --seqlen 32 --out q --eval wikitext2,ptb,c4"
    run_command([*cli, *quantize.split(), "--eval-windows", "1", "--no-progress"], tmp_path, "quantize")
    evaluate = ["eval", "q", "--eval", "wikitext2", "--eval-seqlen", "32", "--json"]
    assert '"wikitext2"' in run_command([*cli, *evaluate], tmp_path, "baq-hf eval").stdout
    assert "16-bit original" in run_command([*cli, "inspect", "q"], tmp_path, "baq-hf inspect").stdout
