"""Inspect a saved BAQ checkpoint: per-layer bits, sizes and allocation ratios, as tables and plots.

Everything here reads the safetensors files directly (``safe_open`` + :func:`format.unpack_header`),
so inspecting a checkpoint never builds the model: it works for models that do not fit in memory and
needs neither the architecture's code nor a GPU. Only the small ``bits_header`` tensors are loaded;
the sizes of the other tensors come from the safetensors headers.

The optional ``baq_report.json`` written by ``baq-hf quantize`` adds what only calibration knows:
Ratio_C = GM(C)/AM(C) (paper eq. 9), the modelled Ratio_L and, with ``compare_uniform``, the
measured Ratio_L = BAQ loss / uniform GPTQ loss of every layer (the paper's Fig. 2-3).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import format as fmt

REPORT_FILE = "baq_report.json"


@dataclass
class LayerInfo:
    """One BaqLinear layer as stored in the checkpoint, plus calibration stats when known."""

    name: str
    out_features: int
    in_features: int
    group_size: int
    code_bits: float
    effective_bits: float
    storage_bytes: int
    bit_histogram: list[int]  # number of input columns per bitwidth 0..15
    ratio_c: float | None = None
    ratio_l: float | None = None  # measured (compare_uniform=True)
    ratio_l_model: float | None = None  # from the sensitivity model, always available after calibration
    # at a fractional target no uniform run has the same storage: the ratios to both integer neighbours
    ratio_l_vs: dict[str, float] | None = None
    ratio_l_model_vs: dict[str, float] | None = None

    @property
    def n_weights(self) -> int:
        return self.out_features * self.in_features

    @property
    def layer_type(self) -> str:
        """The last name component (q_proj, down_proj, c_attn, fc1, ...): what plots group by."""
        return self.name.rpartition(".")[2]


@dataclass
class CheckpointSummary:
    """Everything ``baq-hf inspect`` prints: the layers, model-wide totals and the folder's files."""

    folder: str
    layers: list[LayerInfo]
    files: dict[str, int]  # file name -> bytes
    size: SizeOnDisk | None = None
    eval: dict[str, Any] = field(default_factory=dict)
    quantization_config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_weights(self) -> int:
        return sum(layer.n_weights for layer in self.layers)

    @property
    def code_bits(self) -> float:
        """Mean code bits per weight over all BaqLinear layers (weighted by their sizes)."""
        n = self.n_weights
        return sum(layer.code_bits * layer.n_weights for layer in self.layers) / n if n else float("nan")

    @property
    def effective_bits(self) -> float:
        """8 x bytes of every stored BaqLinear tensor / number of quantized weights."""
        n = self.n_weights
        return 8.0 * sum(layer.storage_bytes for layer in self.layers) / n if n else float("nan")

    def weight_histogram(self) -> list[int]:
        """Number of weights stored at each bitwidth, over the whole model."""
        total = [0] * (fmt.MAX_BITS + 1)
        for layer in self.layers:
            for bits, cols in enumerate(layer.bit_histogram):
                total[bits] += cols * layer.out_features
        return total

    def to_dict(self) -> dict[str, Any]:
        return _finite(
            {
                "folder": self.folder,
                "totals": {
                    "layers": len(self.layers),
                    "quantized_weights": self.n_weights,
                    "code_bits": self.code_bits,
                    "effective_bits": self.effective_bits,
                    "weight_histogram": self.weight_histogram(),
                    "files_bytes": sum(self.files.values()),
                    **(self.size.to_dict() if self.size else {}),
                },
                "files": self.files,
                "layers": [asdict(layer) for layer in self.layers],
                "eval": self.eval,
                "quantization_config": self.quantization_config,
            }
        )


def _finite(obj: Any) -> Any:
    """Replace NaN/inf by None so the JSON is standard (json.dump would write bare NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(obj: Any) -> str:
    """Strict JSON (NaN -> null) for reports other tools read; keeps insertion (execution) order."""
    return json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n"


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint's safetensors files (one file or the shards of an index)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder; give the folder a BAQ model was saved to")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {str(folder)!r}; is this a saved BAQ model?")
    return files


def _read_listing(folder: str | Path) -> tuple[dict[str, fmt.TensorInfo], dict[str, Path]]:
    """Every stored tensor's shape and dtype, and the file holding it (shards may split a layer)."""
    listing: dict[str, fmt.TensorInfo] = {}
    file_of: dict[str, Path] = {}
    for path in safetensors_files(folder):
        header = fmt.read_safetensors_header(path)
        listing.update(header)
        file_of.update(dict.fromkeys(header, path))
    return listing, file_of


def read_layers(folder: str | Path) -> list[LayerInfo]:
    """Every BaqLinear layer of a saved checkpoint, in checkpoint order, without building the model."""
    from safetensors import safe_open

    listing, file_of = _read_listing(folder)
    layers = []
    for module, tensors in fmt.packed_layers(listing).items():
        shape = fmt.WeightShape.from_shapes({t: info.shape for t, info in tensors.items()}, module)
        key = f"{module}.{fmt.HEADER_TENSOR}"
        with safe_open(str(file_of[key]), framework="pt") as f:
            header = f.get_tensor(key)
        n_in, n_out = shape.in_features, shape.out_features
        bits = fmt.unpack_header(header, n_in)
        nbytes = sum(tensors[spec.name].nbytes for spec in shape.specs())
        hist = [0] * (fmt.MAX_BITS + 1)
        for b, count in Counter(bits.tolist()).items():
            hist[int(b)] = count
        layers.append(
            LayerInfo(
                name=module,
                out_features=n_out,
                in_features=n_in,
                group_size=shape.group_size,
                code_bits=float(bits.double().mean()) if n_in else 0.0,
                effective_bits=8.0 * nbytes / (n_out * n_in) if n_out * n_in else float("nan"),
                storage_bytes=nbytes,
                bit_histogram=_trim(hist),
            )
        )
    return layers


@dataclass(frozen=True)
class SizeOnDisk:
    """A saved model's weight files next to its float original stored at 16 bits per parameter."""

    safetensors_bytes: int  # all *.safetensors files of the folder
    float_parameters: int  # parameters of the model before quantization, tied weights once
    unquantized_dtypes: tuple[str, ...]  # safetensors dtypes of the float tensors stored unquantized

    @property
    def original_16bit_bytes(self) -> int:
        return 2 * self.float_parameters

    @property
    def ratio(self) -> float:
        return self.safetensors_bytes / self.original_16bit_bytes if self.float_parameters else float("nan")

    def text(self) -> str:
        """E.g. ``64.10 MiB on disk, 0.24x the 16-bit original (256.60 MiB)``."""
        return (
            f"{human_bytes(self.safetensors_bytes)} on disk, {_fmt(self.ratio, 2)}x the 16-bit original "
            f"({human_bytes(self.original_16bit_bytes)})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "safetensors_bytes": self.safetensors_bytes,
            "original_16bit_bytes": self.original_16bit_bytes,
            "ratio": self.ratio,
            "float_parameters": self.float_parameters,
            "unquantized_dtypes": list(self.unquantized_dtypes),
        }


def size_on_disk(folder: str | Path) -> SizeOnDisk:
    """Size of a saved checkpoint's weights and of its float original at 2 bytes per parameter.

    The original's parameters are counted from the safetensors headers: out x in (and the bias) of
    every packed layer, and every other float tensor (saved once even when tied).
    """
    listing, _ = _read_listing(folder)
    params = 0
    packed: set[str] = set()
    for module, tensors in fmt.packed_layers(listing).items():
        shape = fmt.WeightShape.from_shapes({t: info.shape for t, info in tensors.items()}, module)
        params += shape.out_features * shape.in_features + (shape.out_features if shape.has_bias else 0)
        packed.update(f"{module}.{t}" for t in tensors)
    dtypes = set()
    for key, info in listing.items():
        if key not in packed and info.torch_dtype.is_floating_point:
            params += math.prod(info.shape)
            dtypes.add(info.dtype)
    total = sum(path.stat().st_size for path in safetensors_files(folder))
    return SizeOnDisk(total, params, tuple(sorted(dtypes)))


def _trim(hist: list[int]) -> list[int]:
    """Drop trailing zero counts (a histogram up to the largest bitwidth used)."""
    end = len(hist)
    while end > 1 and hist[end - 1] == 0:
        end -= 1
    return hist[:end]


def load_report(folder: str | Path) -> dict[str, Any] | None:
    """The folder's baq_report.json, or None when there is none."""
    path = Path(folder) / REPORT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc


def _report_layers(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-layer stats from either a CLI report ({"report": {"layers": ...}}) or model.baq_report."""
    inner = report.get("report", report)
    layers = inner.get("layers", {}) if isinstance(inner, dict) else {}
    return layers if isinstance(layers, dict) else {}


def _match(name: str, stats: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Report entry of a checkpoint layer; tolerates a base-model prefix present on one side only."""
    if name in stats:
        return stats[name]
    for key, value in stats.items():
        if key.endswith("." + name) or name.endswith("." + key):
            return value
    return None


def _natural_key(name: str) -> list[Any]:
    """``layers.10`` after ``layers.9``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize(folder: str | Path) -> CheckpointSummary:
    """Read layers, files, and (when present) baq_report.json and config.json of a saved model."""
    folder = Path(folder)
    layers = read_layers(folder)
    report = load_report(folder) or {}
    stats = _report_layers(report)
    order = {name: i for i, name in enumerate(stats)}  # the report lists layers in execution order
    for layer in layers:
        entry = _match(layer.name, stats)
        if entry:
            layer.ratio_c = _num(entry.get("ratio_c"))
            layer.ratio_l = _num(entry.get("ratio_l"))
            layer.ratio_l_model = _num(entry.get("ratio_l_model"))
            layer.ratio_l_vs = _neighbours(entry.get("ratio_l_vs"))
            layer.ratio_l_model_vs = _neighbours(entry.get("ratio_l_model_vs"))
    layers.sort(key=lambda la: (_natural_key(la.name)[:-1], order.get(la.name, len(order)), la.name))
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    qconfig: dict[str, Any] = {}
    config_path = folder / "config.json"
    if config_path.is_file():
        try:
            qconfig = json.loads(config_path.read_text(encoding="utf-8")).get("quantization_config") or {}
        except ValueError:
            qconfig = {}
    return CheckpointSummary(
        folder=str(folder),
        layers=layers,
        files=files,
        size=size_on_disk(folder),
        eval=report.get("eval", {}) if isinstance(report.get("eval"), dict) else {},
        quantization_config=qconfig,
    )


# ---------------------------------------------------------------------------------------------- text


def histogram_text(hist: list[int]) -> str:
    """Compact histogram: ``bits:count`` for every bitwidth used, e.g. ``2:32 3:32``."""
    return " ".join(f"{b}:{n}" for b, n in enumerate(hist) if n)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _neighbours(value: Any) -> dict[str, float] | None:
    """A report's {"2": ratio, "3": ratio} entry, with its numbers checked (reports are untrusted)."""
    if not isinstance(value, dict):
        return None
    return {str(k): v for k, v in ((k, _num(v)) for k, v in value.items()) if v is not None} or None


def ratio_text(value: float | None, by_neighbour: dict[str, float] | None) -> str:
    """A Ratio_L cell: one number at an integer target, "2:x 3:y" against both neighbours otherwise."""
    if value is None and by_neighbour:
        return " ".join(f"{bits}:{_fmt(r)}" for bits, r in sorted(by_neighbour.items()))
    return _fmt(value)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


# what each ratio column means, printed under the table (columns that are "-" in every row are left out)
RATIO_LEGEND = {
    "Ratio_C": "Ratio_C = GM(C)/AM(C) of the column sensitivities (paper eq. 9); below 1 per-column bits pay",
    "Ratio_L": "Ratio_L = BAQ loss / uniform GPTQ loss at the same storage, measured (--compare-uniform)",
    "Ratio_L(model)": "Ratio_L(model) = that ratio as the sensitivity model sum_j C_j 2^(-2 R_j) predicts it",
}


def format_table(summary: CheckpointSummary) -> str:
    """The per-layer table and the totals, as ``baq-hf inspect`` prints them."""
    header = [
        "layer",
        "out x in",
        "code bits",
        "eff bits",
        "Ratio_C",
        "Ratio_L",
        "Ratio_L(model)",
        "histogram",
    ]
    rows = [
        [
            layer.name,
            f"{layer.out_features}x{layer.in_features}",
            _fmt(layer.code_bits),
            _fmt(layer.effective_bits),
            _fmt(layer.ratio_c),
            ratio_text(layer.ratio_l, layer.ratio_l_vs),
            ratio_text(layer.ratio_l_model, layer.ratio_l_model_vs),
            histogram_text(layer.bit_histogram),
        ]
        for layer in summary.layers
    ]
    ratios = {"Ratio_C", "Ratio_L", "Ratio_L(model)"}
    shown = [i for i, name in enumerate(header) if name not in ratios or any(r[i] != "-" for r in rows)]
    numeric = {j for j, i in enumerate(shown) if header[i] not in ("layer", "out x in", "histogram")}
    header = [header[i] for i in shown]
    rows = [[r[i] for i in shown] for r in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out += [f"  {text}" for name, text in RATIO_LEGEND.items() if name in header]
    if any(layer.ratio_l_vs or layer.ratio_l_model_vs for layer in summary.layers):
        out.append("  a:x b:y = against a-bit and b-bit uniform GPTQ (the target lies between them)")
    out.append("")
    out.append(f"BaqLinear layers:     {len(summary.layers)} ({summary.n_weights:,} quantized weights)")
    out.append(
        f"mean code bits:       {_fmt(summary.code_bits)}  (histogram over all weights: "
        f"{histogram_text(summary.weight_histogram())})"
    )
    out.append(f"effective bits:       {_fmt(summary.effective_bits)}  (codes, header, ranges, index, bias)")
    if summary.size is not None:
        dtypes = ", ".join(summary.size.unquantized_dtypes) or "none"
        out.append(f"weights:              {summary.size.text()}; unquantized tensors stored as {dtypes}")
    if summary.layers and all(layer.ratio_l is None and not layer.ratio_l_vs for layer in summary.layers):
        out.append("Ratio_L (measured):   not in the report (quantize with --compare-uniform to measure it)")
    out.append("files:")
    for name, size in summary.files.items():
        out.append(f"  {name:<40} {human_bytes(size):>12}")
    out.append(f"  {'total':<40} {human_bytes(sum(summary.files.values())):>12}")
    if summary.eval:
        out.append("")
        out.append(format_eval_table(summary.eval))
    return "\n".join(out)


def format_eval_table(results: dict[str, Any]) -> str:
    """``dataset  fp ppl  BAQ ppl`` from {name: {"fp": {"ppl": ..}, "baq": {"ppl": ..}}} (either may miss)."""

    def ppl(entry: Any) -> float | None:
        if isinstance(entry, dict):
            return _num(entry.get("ppl"))
        return _num(entry)

    rows = [["dataset", "fp ppl", "BAQ ppl"]]
    for name, entry in results.items():
        entry = entry if isinstance(entry, dict) else {"baq": entry}
        rows.append([name, _fmt(ppl(entry.get("fp")), 2), _fmt(ppl(entry.get("baq")), 2)])
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        f"{r[0].ljust(widths[0])}  {r[1].rjust(widths[1])}  {r[2].rjust(widths[2])}" for r in rows
    )


# ---------------------------------------------------------------------------------------------- plots


def plot_summary(summary: CheckpointSummary, outdir: str | Path) -> list[Path]:
    """Write PNGs: the model's bit histogram, histograms per layer type, and Ratio_C vs Ratio_L.

    The Ratio plot (paper Fig. 2-3) is written only when the report has the ratios; it uses the
    measured Ratio_L when every layer has one, else the modelled Ratio_L (and says so on the axis).
    Returns the written paths.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'baq_hf[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summary.layers:
        raise ValueError(f"{summary.folder} holds no BaqLinear layer to plot")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    # 1. whole-model histogram, as the share of weights at each bitwidth
    hist = _trim(summary.weight_histogram())
    total = sum(hist)
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(range(len(hist)), [100.0 * h / total for h in hist], color="#3b6ea8")
    for bar, h in zip(bars, hist, strict=True):
        if h:
            share = 100.0 * h / total
            ax.annotate(
                f"{share:.1f}%" if share >= 0.1 else f"{share:.2g}%",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(range(len(hist)))
    ax.set_xlabel("bits per weight (column bitwidth)")
    ax.set_ylabel("share of quantized weights (%)")
    ax.set_title(
        f"Bit allocation, whole model: {summary.code_bits:.3f} code bits, "
        f"{summary.effective_bits:.3f} effective bits",
        fontsize=10,
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    written.append(_save(fig, outdir / "bit_histogram.png", plt))

    # 2. per layer type: share of columns at each bitwidth, one panel per type
    by_type: dict[str, list[int]] = defaultdict(lambda: [0] * (fmt.MAX_BITS + 1))
    mean_bits: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for layer in summary.layers:
        for b, n in enumerate(layer.bit_histogram):
            by_type[layer.layer_type][b] += n * layer.out_features
        mean_bits[layer.layer_type][0] += layer.code_bits * layer.n_weights
        mean_bits[layer.layer_type][1] += layer.n_weights
    types = list(by_type)
    max_bits = max(len(_trim(h)) for h in by_type.values())
    ncols = min(4, len(types))
    nrows = math.ceil(len(types) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False, sharey=True)
    for ax, t in zip(axes.flat, types, strict=False):
        h = by_type[t][:max_bits]
        s = sum(h) or 1
        ax.bar(range(max_bits), [100.0 * v / s for v in h], color="#3b6ea8")
        ax.set_title(f"{t} ({mean_bits[t][0] / mean_bits[t][1]:.2f} bits)", fontsize=9)
        ax.set_xticks(range(max_bits))
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(types) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("% of weights", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("bits", fontsize=8)
    fig.suptitle("Bit allocation per layer type (all blocks)", fontsize=10)
    fig.tight_layout()
    written.append(_save(fig, outdir / "bit_histogram_by_type.png", plt))

    # 3. Ratio_C vs Ratio_L (paper Fig. 2-3)
    measured = all(layer.ratio_l is not None or layer.ratio_l_vs for layer in summary.layers)

    def ratios(layer: LayerInfo) -> dict[str, float | None]:
        """Ratio_L by uniform baseline: "" at an integer target, each integer neighbour otherwise."""
        value, vs = (
            (layer.ratio_l, layer.ratio_l_vs) if measured else (layer.ratio_l_model, layer.ratio_l_model_vs)
        )
        return {"": value} if value is not None or not vs else {f" vs {b} bits": r for b, r in vs.items()}

    pairs = [
        (layer, layer.ratio_c, r, suffix) for layer in summary.layers for suffix, r in ratios(layer).items()
    ]
    pairs = [
        (la, c, r, s) for la, c, r, s in pairs if c is not None and r is not None and math.isfinite(c * r)
    ]
    if pairs:
        fig, ax = plt.subplots(figsize=(5.5, 5.5))
        cmap = plt.get_cmap("tab10")
        markers = dict(zip(sorted({s for *_, s in pairs}), "o^sv", strict=False))
        for i, t in enumerate(types):
            for suffix, marker in markers.items():
                pts = [(c, r) for la, c, r, s in pairs if la.layer_type == t and s == suffix]
                if pts:
                    ax.scatter(
                        [c for c, _ in pts],
                        [r for _, r in pts],
                        s=22,
                        marker=marker,
                        label=t + suffix,
                        color=cmap(i % 10),
                        alpha=0.8,
                    )
        hi = max(1.0, *(max(c, r) for _, c, r, _ in pairs)) * 1.02
        ax.plot([0, hi], [0, hi], color="grey", lw=1, ls="--", label="y = x")
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_aspect("equal")
        ax.set_xlabel("Ratio_C = GM(C) / AM(C)  (predicted loss ratio)")
        which = "measured" if measured else "modelled; --compare-uniform measures it"
        ax.set_ylabel(f"Ratio_L = BAQ loss / uniform loss ({which})")
        ax.set_title("BAQ vs uniform GPTQ, per layer (lower is better)", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, outdir / "ratio_c_vs_ratio_l.png", plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
