#!/usr/bin/env bash
# Every GPU measurement of the project in one call, for a CUDA machine lent for a few minutes
# (~520 s in all, for a 580 s call; each stage has a time cap and the last one gets what is left):
#   1. kernels: config sweep (writes the tuned table baq_hf/kernels/tuned/<gpu>.json), layer table
#      vs fp16 matmul and dequantize + matmul (do_bench, L2 flushed), 32 Llama-2-7B blocks of
#      projections replayed in one CUDA graph (% of peak bandwidth)     -> docs/results/kernels.*
#   2. decode eager and with a static cache + torch.compile(mode="reduce-overhead") for fp16 and BAQ
#      (Llama-2-7B shapes, 3 bits), prefill of 2048 tokens, GPU memory   -> docs/results/generate.*
#   3. quantization time and memory per Llama-2-7B-shaped block          -> docs/results/quant_time_gpu.*
#   4. the CUDA tests, verbose with tracebacks (the kernels, HF integration on the GPU)
# Kernels are compiled before they are timed (in parallel processes). Everything printed goes to
# $OUT/session.log, the results to $OUT (8 files in all, what the lending tool returns): copy
# kernels.*, generate.* and quant_time_gpu.* into docs/results/ and the tuned table <gpu>.json into
# baq_hf/kernels/tuned/ (docs/results/gpu/README.md).
#
#   bash benchmarks/gpu_session.sh              # on the GPU machine
#   DRY_RUN=1 BUDGET=36000 bash benchmarks/gpu_session.sh  # CPU: every stage on tiny shapes, Triton
#                                                          # interpreter (caps x CAP_SCALE, default 30)
#
# Wheels in .whl/ (e.g. the transformers this repo was tested with) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_session}"
mkdir -p "$OUT"
LOG="$OUT/session.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-520}"
START=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  if PYTHONPATH=/tmp/site "$PY" -c "import transformers" 2>/dev/null; then
    export PYTHONPATH=/tmp/site
  else
    echo "carried wheels do not import here; using the installed packages" | tee -a "$LOG"
  fi
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
DRY=()
SCALE=1  # stage caps are multiplied by this: the interpreter of a dry run is slow
if [ -n "${DRY_RUN:-}" ]; then
  export TRITON_INTERPRET=1
  DRY=(--dry-run)
  SCALE="${CAP_SCALE:-30}"
fi

left() { echo $((BUDGET - (SECONDS - START))); }

# stage NAME CAP_SECONDS COMMAND...: run with the smaller of CAP and the time left, log everything
stage() {
  local name=$1 cap=$(($2 * SCALE)) t s0=$SECONDS
  shift 2
  t=$(left)
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then
    echo "== $name: skipped ($(left) s left)" | tee -a "$LOG"
    return
  fi
  echo "== $name (limit ${t} s, $(left) s left): $*" | tee -a "$LOG"
  timeout -k 5 "$t" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - s0)) s" | tee -a "$LOG"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  "$PY" -c "import os, torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cpus', os.cpu_count())"
} 2>&1 | tee -a "$LOG"

out() { echo --out-md "$OUT/$1.md" --out-json "$OUT/$1.json"; }
# shellcheck disable=SC2046
stage kernels 150 "$PY" benchmarks/kernel_bench.py --tune --graph --table-dir "$OUT" $(out kernels) "${DRY[@]}"
# shellcheck disable=SC2046
stage generate 210 "$PY" benchmarks/generate.py --models llama2-7b --bits 3 --new-tokens 64 $(out generate) \
  "${DRY[@]}"
# shellcheck disable=SC2046
stage quant_time_gpu 50 "$PY" benchmarks/quant_time_gpu.py $(out quant_time_gpu) "${DRY[@]}"
# the CUDA tests first, then test_usage (its accelerate-offload and whole-model-compile tests failed on the
# last GPU run without tracebacks), then the HF integration on the GPU
TESTS=(tests/test_kernels.py::TestGpu)
[ -z "${DRY_RUN:-}" ] && TESTS+=(tests/test_usage.py tests/test_hf_integration.py)
TESTS+=(tests/test_kernel_layout.py)
stage pytest 400 "$PY" -m pytest -v -rfE --tb=short -p no:cacheprovider "${TESTS[@]}"

echo "== done after $((SECONDS - START)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
exit 0
