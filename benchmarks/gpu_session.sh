#!/usr/bin/env bash
# Every GPU check of the project in one run, for a CUDA machine lent for a few minutes:
# the CUDA tests (kernels against the torch reference, quantize/save/load/generate on the GPU),
# then the kernel micro-benchmark and the batch-1 generate benchmark (docs/results/kernels.*,
# generate.*). Logs and results are copied to $OUT when it is set (the lending tool's output folder).
#
#   bash benchmarks/gpu_session.sh
#
# Wheels in .whl/ (e.g. the transformers this repo was tested with) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_session}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  if PYTHONPATH=/tmp/site "$PY" -c "import transformers" 2>/dev/null; then
    export PYTHONPATH=/tmp/site
  else
    echo "carried wheels do not import here; using the installed packages" >&2
  fi
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

# the CUDA-only tests first; the interpreter-sized kernel tests compile many variants (minutes)
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -v -rfE --tb=short -p no:cacheprovider \
  --junitxml="$OUT/junit.xml" tests/test_kernels.py::TestGpu tests/test_hf_integration.py \
  tests/test_usage.py tests/test_kernels.py 2>&1 | tee "$OUT/pytest_gpu.log"
echo "pytest exit: $?" | tee -a "$OUT/pytest_gpu.log"

timeout "${KERNELS_TIMEOUT:-200}" "$PY" benchmarks/kernel_bench.py 2>&1 | tee "$OUT/kernels.log"
timeout "${GENERATE_TIMEOUT:-150}" "$PY" benchmarks/generate.py 2>&1 | tee "$OUT/generate.log"
cp docs/results/kernels.md docs/results/kernels.json docs/results/generate.md docs/results/generate.json \
  "$OUT"/ 2>/dev/null
exit 0
