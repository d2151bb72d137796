"""Zero-shot accuracy with lm-evaluation-harness on a model as baq_hf loads it (BAQ or float).

lm-eval (an optional extra: ``pip install "baq_hf[zeroshot]"``) runs the model object through its
``HFLM`` wrapper, zero-shot. Online, the stock task names load the stock tasks (and their Hub
datasets). Offline, ``task_data`` names a folder laid out like the upstream releases (see
``zeroshot_tasks/local_data.py``); the five tasks of ``LOCAL_TASKS`` are then the stock definitions
with only the data source changed (``zeroshot_tasks/*.yaml``), so the scores equal the stock tasks'.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .zeroshot_tasks.local_data import LAYOUT, missing_files

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LOCAL_TASKS: tuple[str, ...] = tuple(LAYOUT)
TASKS_DIR = Path(__file__).resolve().parent / "zeroshot_tasks"
INSTALL_HINT = 'pip install "baq_hf[zeroshot]"  (or: pip install "lm-eval==0.4.*")'
# The stock definitions the local tasks copy, relative to lm_eval/tasks/.
STOCK_YAML: dict[str, str] = {
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "winogrande": "winogrande/default.yaml",
}
# Metrics shown in the table, in this order; the JSON keeps every metric lm-eval reports.
TABLE_METRICS = ("acc", "acc_norm", "perplexity")
DEFAULT_BATCH_SIZE = 16


def require_lm_eval() -> Any:
    """Import lm-eval, or explain how to install it."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401  (the API used below)
    except ImportError as exc:
        raise ImportError(
            f"zero-shot evaluation needs lm-evaluation-harness; install it with {INSTALL_HINT}"
        ) from exc
    return lm_eval


def task_manager(task_data: str | os.PathLike | None) -> Any:
    """lm-eval's TaskManager: stock tasks when ``task_data`` is None, else the local tasks on that folder."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if task_data is None:
        return TaskManager()
    folder = Path(task_data).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"task data folder {str(folder)!r} does not exist")
    return TaskManager(
        include_path=str(TASKS_DIR), include_defaults=False, metadata={"task_data": str(folder.resolve())}
    )


def check_tasks(tasks: Sequence[str], task_data: str | os.PathLike | None, manager: Any) -> list[str]:
    """Reject unknown task names (with the closest known ones) and, offline, missing data files."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError("give at least one task, e.g. piqa,arc_easy")
    known = LOCAL_TASKS if task_data is not None else tuple(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = (
                f"the local tasks are {', '.join(LOCAL_TASKS)}; without task data any stock lm-eval task runs"
                if task_data is not None
                else "`lm-eval ls tasks` lists the stock tasks"
            )
            raise KeyError(f"unknown zero-shot task {name!r}{hint} ({where})")
    if task_data is not None:
        missing = [str(p) for name in names for p in missing_files(Path(task_data).expanduser(), name)]
        if missing:
            raise FileNotFoundError(
                f"task data missing: {', '.join(missing)}; the folder must be laid out as "
                + "; ".join(f"{t}: {', '.join(LAYOUT[t][1])}" for t in names)
            )
    return names


@dataclass
class ZeroShotResult:
    """Scores per task (``metrics[task][metric]`` with ``<metric>_stderr``), item counts and settings."""

    metrics: dict[str, dict[str, float]]
    n_items: dict[str, int]
    settings: dict[str, Any]
    versions: dict[str, Any]
    task_configs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "n_items": self.n_items,
            "settings": self.settings,
            "versions": self.versions,
            "task_configs": self.task_configs,
        }

    def table(self) -> str:
        """Tasks as rows, acc / acc_norm / perplexity as ``value ± stderr`` columns."""
        shown = [m for m in TABLE_METRICS if any(m in v for v in self.metrics.values())]
        rows = [["task", "n", *shown]]
        for task, values in self.metrics.items():
            cells = []
            for metric in shown:
                value, stderr = values.get(metric), values.get(f"{metric}_stderr")
                cells.append("-" if value is None else _with_stderr(value, stderr))
            rows.append([task, str(self.n_items.get(task, "?")), *cells])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))])
            for r in rows
        )


def _with_stderr(value: float, stderr: float | None) -> str:
    text = f"{value:.4f}"
    return text if stderr is None else f"{text} ± {stderr:.4f}"


def _number(value: Any) -> float | None:
    """lm-eval reports a missing stderr as the string "N/A"."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _jsonable(value: Any) -> Any:
    """Task configs hold functions (custom datasets, prompt functions): name them instead."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def versions() -> dict[str, str]:
    """Versions of everything that can move a score."""
    out = {"python": platform.python_version()}
    for dist in ("baq_hf", "lm_eval", "torch", "transformers", "datasets"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


@contextlib.contextmanager
def _quiet_lm_eval(progress: bool) -> Iterator[None]:
    """Hide lm-eval's info and warning lines (e.g. that the model is a ready object), and maybe its bars;
    its prints (``bootstrapping for stddev``) go to stderr, so stdout carries only the results."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    saved_tqdm = os.environ.get("TQDM_DISABLE")
    logger.setLevel(logging.ERROR)
    if not progress:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)
        if saved_tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved_tqdm


def evaluate_zeroshot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    task_data: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    bootstrap_iters: int = 100_000,
    progress: bool = True,
) -> ZeroShotResult:
    """Run lm-eval zero-shot on ``model`` where it is (CPU or GPU) and return the scores.

    ``task_data``: folder of local task files (offline, ``LOCAL_TASKS`` only); None runs the stock tasks,
    which download their datasets. ``limit`` keeps the first N items of each task (quick checks; the
    scores are then not comparable with published ones). ``batch_size`` is lm-eval's; scores can move
    in the last digits with it (padding changes the matmul shapes), so it is part of the settings.
    ``bootstrap_iters`` is lm-eval's default (it sets the LAMBADA perplexity's stderr).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an integer >= 1, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    manager = task_manager(task_data)
    names = check_tasks(tasks, task_data, manager)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    try:
        with _quiet_lm_eval(progress):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=0,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                task_manager=manager,
                log_samples=False,
            )
    finally:
        model.train(was_training)
    return _result(raw, names, task_data, limit, batch_size, bootstrap_iters, model)


def _result(
    raw: dict[str, Any],
    names: list[str],
    task_data: str | os.PathLike | None,
    limit: int | None,
    batch_size: int,
    bootstrap_iters: int,
    model: PreTrainedModel,
) -> ZeroShotResult:
    metrics: dict[str, dict[str, float]] = {}
    for task in names:
        values = {}
        for key, value in raw["results"][task].items():
            metric, _, filt = key.partition(",")
            if filt == "none" and _number(value) is not None:
                values[metric] = float(value)
        metrics[task] = values
    n_items = {task: int(raw["n-samples"][task]["effective"]) for task in names}
    config = raw.get("config", {})
    parameter = next(model.parameters())
    settings = {
        "tasks": names,
        "task_source": "stock lm-eval tasks"
        if task_data is None
        else f"baq_hf/zeroshot_tasks on {Path(task_data).expanduser().resolve()}",
        "num_fewshot": 0,
        "limit": limit,
        "batch_size": batch_size,
        "bootstrap_iters": bootstrap_iters,
        "device": str(parameter.device),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "model": getattr(model.config, "_name_or_path", None) or type(model).__name__,
        "seeds": {k: config.get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")},
        "task_versions": {task: raw.get("versions", {}).get(task) for task in names},
    }
    configs = {task: _jsonable(raw.get("configs", {}).get(task)) for task in names}
    return ZeroShotResult(metrics, n_items, settings, versions(), configs)


def write_stock_reference_tasks(folder: str | os.PathLike) -> Path:
    """Write lm-eval task YAMLs that include the installed stock definitions and swap in the local data.

    The reference for the local tasks: loaded with ``TaskManager(include_path=folder, metadata={"task_data":
    ...})`` they run the stock prompts, choices and metrics (from the installed lm-eval) on the same files.
    Only the data source and the training/validation splits (few-shot sources, unused zero-shot) change.
    """
    lm_eval = require_lm_eval()
    stock_root = Path(lm_eval.__file__).resolve().parent / "tasks"
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for task, relative in STOCK_YAML.items():
        split = LAYOUT[task][0]
        unused = [s for s in ("training_split", "validation_split") if s != f"{split}_split"]
        lines = [
            f"include: {stock_root / relative}",
            f"task: {task}",
            f"custom_dataset: !function baq_hf.zeroshot_tasks.local_data.{task}",
            *(f"{s}: null" for s in unused),
        ]
        (out / f"{task}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
