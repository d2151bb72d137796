"""Static (CPU-side) analysis of the BAQ kernels compiled for sm_90: loads, spills, registers.

    python benchmarks/kernel_static.py   # docs/results/kernels_static.{md,json}, a summary in kernels.md

No GPU is needed: every variant is compiled ahead of time for Hopper with ``triton.compile`` and an
explicit target (see baq_hf/kernels/aot.py), and the PTX and the cubin are read. This says whether
the code can stream weights at full bandwidth (16-byte loads of the code words, no spills, registers
that leave room for several programs per SM), not how fast it runs: that needs a GPU
(``bash benchmarks/gpu_session.sh``). Compile times are cold (Triton's cache bypassed) and depend on
the machine's load.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
os.environ.setdefault("TRITON_ALWAYS_COMPILE", "1")  # cold compile times
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import triton  # noqa: E402
from kernel_bench import put_static_section  # noqa: E402  (benchmarks/kernel_bench.py, beside this script)

from baq_hf.kernels import aot  # noqa: E402
from baq_hf.kernels.configs import KernelConfig, candidates, fallback  # noqa: E402

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def variants() -> list[aot.Variant]:
    """The fallback configs in every dtype, all widths 1-8 in one gemv, and two more gemv shapes."""
    out = [aot.Variant("gemv", torch.float16, fallback("gemv"), widths=tuple(range(1, 9)))]
    out += [aot.Variant("gemv", d, fallback("gemv"), widths=(2, 3, 4)) for d in DTYPES]
    out += [aot.Variant("gemv", torch.float16, c, widths=(2, 3, 4)) for c in candidates("gemv")[1::9]]
    for d in DTYPES:
        for grouped in (False, True):
            out += [aot.Variant("tile", d, fallback("tile"), grouped=grouped, batch=b) for b in (1, 16)]
    out += [
        aot.Variant("dequant", torch.float16, KernelConfig("dequant", 64, 64, 4), grouped=g) for g in (0, 1)
    ]
    return out


def summary(rows: list[dict], meta: dict) -> str:
    """The kernels.md section: what the static analysis found, in a few lines."""
    gemv = [r["registers"] for r in rows if r["variant"].startswith("gemv")]
    regs = [r["registers"] for r in rows]
    ok_loads = all(r["loads_v4_b32"] >= r["expected_v4_loads"] for r in rows)
    spills = sum(r["spill_instructions"] + r["local_bytes"] + r["stack_bytes"] for r in rows)
    secs = [r["compile_s"] for r in rows]
    return "\n".join(
        [
            "## Static analysis for sm_90 (CPU-side: compiled ahead of time, no GPU, no timing)",
            "",
            f"{len(rows)} kernel variants compiled for Hopper with triton {meta['triton']} on "
            f"{meta['machine']} ({meta['date']}; `{meta['command']}`; details in "
            "[kernels_static.md](kernels_static.md)): code words read with 16-byte loads as the layout "
            f"allows in {'every' if ok_loads else 'NOT every'} variant; "
            f"{'no' if spills == 0 else spills} spill instructions or local memory; registers per thread "
            f"{min(regs)}-{max(regs)} (GEMV {min(gemv)}-{max(gemv)}); cold compile "
            f"{min(secs):.0f}-{max(secs):.0f} s per variant.",
        ]
    )


def write(rows: list[dict], meta: dict, md: Path, js: Path, kernels_md: Path) -> None:
    js.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    put_static_section(kernels_md, summary(rows, meta))
    lines = [
        "# BaqLinear kernels: static analysis for sm_90 (CPU-side, no GPU)",
        "",
        "Compiled ahead of time for Hopper (`GPUTarget('cuda', 90, 32)`) on a CPU machine; read from the PTX",
        "and from ptxas' cubin (`cuobjdump -res-usage`, `-sass`). This checks what bandwidth needs; it",
        "measures no speed. Variant names: kernel/activation dtype/BLOCK_N/BLOCK_K/warps[/bitwidths][/rows].",
        "",
        f"- machine: {meta['machine']}; triton {meta['triton']}, torch {meta['torch']}; {meta['date']}",
        f"- command: `{meta['command']}`",
        "- 16-byte loads: `ld.global.v4.b32` in the PTX, found / what the layout allows for the code words"
        " (gemv: one per word row of a run per 4 output rows of a thread; tile and dequant: the low and",
        "  high words of the code tile; grouped tiles also load their fp16 ranges 16 bytes at a time).",
        "- spills: STL/LDL instructions in the SASS; local and stack bytes from the resource usage.",
        "- compile s: cold compile of that variant, on a machine shared with other jobs (indicative).",
        "",
        "| variant | compile s | registers | spills | local + stack B | 16-byte loads (found / layout) |"
        " other global loads |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        other = ", ".join(
            f"{k.removeprefix('ld.global.')} x{n}"
            for k, n in sorted(r["loads_by_kind"].items())
            if not k.endswith(".v4.b32")
        )
        lines.append(
            f"| {r['variant']} | {r['compile_s']:.1f} | {r['registers']} | {r['spill_instructions']} "
            f"| {r['local_bytes'] + r['stack_bytes']} | {r['loads_v4_b32']} / {r['expected_v4_loads']} "
            f"| {other} |"
        )
    lines.append("")
    md.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-md", type=Path, default=ROOT / "docs/results/kernels_static.md")
    p.add_argument("--out-json", type=Path, default=ROOT / "docs/results/kernels_static.json")
    p.add_argument("--kernels-md", type=Path, default=ROOT / "docs/results/kernels.md", help="gets a summary")
    args = p.parse_args(argv)
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    meta = {
        "machine": f"{cpu}, {os.cpu_count()} cores",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/kernel_static.py",
        "target": "sm_90",
    }
    rows = []
    for v in variants():
        rows.append(aot.analyze(v).row())
        print(json.dumps(rows[-1]), flush=True)
    write(rows, meta, args.out_md, args.out_json, args.kernels_md)
    print(f"wrote {args.out_md} and {args.out_json}, and the summary in {args.kernels_md}")


if __name__ == "__main__":
    main()
