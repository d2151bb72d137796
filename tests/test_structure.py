"""The package's structure: no import cycle, a core that imports without transformers, one declaration
of every stored tensor."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baq_hf import format as fmt
from baq_hf.linear import BaqLinear

PACKAGE = Path(__file__).resolve().parents[1] / "baq_hf"
CORE = ("format", "allocation", "clipping", "gptq", "linear", "kernels", "specs")


def package_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (at any depth: lazy imports inside functions count)."""
    graph: dict[str, set[str]] = {}
    modules = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
                if not node.level and not target.startswith("baq_hf"):
                    continue
                for alias in node.names:  # `from . import x` names a module, `from .m import x` a value
                    deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("baq_hf"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the modules (the package's __init__ aside: importing any submodule runs
    it, so an edge into it is no cycle), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node] - {"baq_hf"}):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = package_imports()
    assert "baq_hf.kernels.layout" in graph["baq_hf.linear"]  # the walker reads the imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_core_imports_without_transformers():
    code = (
        "import sys\n"
        f"for name in {CORE!r}:\n"
        "    __import__('baq_hf.' + name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'triton'))\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize(
    "first",
    [
        "import baq_hf",
        "import transformers, baq_hf",
        "import baq_hf.config",  # config imports transformers itself
        "import baq_hf.quantizer",
        "import baq_hf.calibration",  # imports transformers before the quantizer exists
        "import baq_hf.cli",
    ],
)
def test_importing_baq_hf_registers_with_transformers_in_any_order(first: str):
    code = (
        f"{first}\n"
        "import transformers\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
        "import baq_hf.config, baq_hf.quantizer\n"
        "assert AUTO_QUANTIZATION_CONFIG_MAPPING['baq'] is baq_hf.config.BaqConfig\n"
        "assert AUTO_QUANTIZER_MAPPING['baq'] is baq_hf.quantizer.BaqHfQuantizer\n"
        "assert type(transformers.__spec__.loader).__name__ == 'SourceFileLoader'  # its own loader\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_stored_tensor_is_declared_once_and_drives_the_layer():
    names = [t.name for t in fmt.TENSORS]
    assert len(names) == len(set(names))
    shape = fmt.WeightShape.of(out_features=6, in_features=8, n_words=3, group_size=4, has_bias=True)
    layer = BaqLinear.from_shape(shape)
    assert set(layer.state_dict()) == {spec.name for spec in shape.specs()}  # buffers follow TENSORS
    for spec in shape.specs():
        t = layer.state_dict()[spec.name]
        assert tuple(t.shape) == spec.shape(shape)
        assert spec.dtype is None or t.dtype == spec.dtype
    per_row = BaqLinear.from_shape(fmt.WeightShape.of(6, 8, 3))
    assert set(per_row.state_dict()) == {"weight", "bits_header", "perm", "range_min", "range_max"}
    assert per_row.group_index is None


def test_packed_weight_round_trips_through_a_layer():
    g = torch.Generator().manual_seed(0)
    bits = torch.tensor([0, 3, 1, 8, 2, 3, 5, 4])
    codes = torch.stack([torch.randint(0, 1 << int(b), (5,), generator=g) for b in bits], dim=1)
    mn, mx = fmt.fit_range(torch.randn(5, 8, generator=g), sym=False)
    packed = fmt.BaqWeight.pack(codes, bits, mn[:, None], mx[:, None], None)
    layer = BaqLinear.from_packed(packed)
    assert torch.equal(layer.dequantize(), packed.dequantize())
    assert torch.equal(layer.column_bits(), bits)
    assert layer.baq_weight.shape == packed.shape
    assert fmt.BaqWeight.from_stored(layer.state_dict()).nbytes() == packed.nbytes()


def test_format_doc_table_lists_exactly_the_declared_tensors():
    doc = (PACKAGE.parent / "docs" / "format.md").read_text()
    section = doc.split("## Tensors of one BaqLinear", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `<p>.")]
    assert [row.split("`")[1].removeprefix("<p>.") for row in rows] == [t.name for t in fmt.TENSORS]
