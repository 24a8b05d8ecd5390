#!/usr/bin/env bash
# The whole GPU check in one command, run from the repository root on a machine with one CUDA GPU:
#   1. installs the wheels found in .whl/ (trl, datasets, dill, multiprocess: see docs/benchmarks.md, "GPU") into
#      /tmp/site when there are any, for a GPU image that has PyTorch, Triton and transformers but not those;
#   2. runs the CUDA tests of the fused entropy path (tests/test_ops_cuda.py);
#   3. runs benchmarks/bench_gpu.py (sized for at most 6 minutes on one H200; not yet run on one), extra arguments
#      passed on.
# Everything it writes goes to $OUT (default /tmp/bench_gpu_out): nvidia_smi.txt, test_ops_cuda.log, bench_gpu.log and
# bench_gpu.json, which then belongs in benchmarks/results/gpu/ (then run `python docs/gen_benchmarks.py`).
#
#   bash benchmarks/run_gpu.sh [bench_gpu.py arguments]
set -uo pipefail
OUT="${OUT:-/tmp/bench_gpu_out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
{ python3 --version; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } 2>&1 | tee "$OUT/nvidia_smi.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py 2>&1 | tee "$OUT/test_ops_cuda.log" | tail -n 15
python3 benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
