#!/usr/bin/env bash
# The Triton backend's GPU work, for a session lent a GPU machine (device `run`,
# repository root, python3 with torch, triton, pytest and matplotlib; nothing to
# install: batchnorm is imported from the checkout). Each part fits one call.
#
#   bash scripts/gpu_session.sh check     # the Triton test suite on CUDA (~2 min)
#   bash scripts/gpu_session.sh bench256  # check, then the N=256 half of the benchmark
#   bash scripts/gpu_session.sh bench32   # the N=32 half, appended to the same CSV
#
# Results go to $OUT (the device tool's folder that comes back): the test log,
# the CSV, the chart and docs/performance.md with the table filled in. Copy them
# into docs/ here (the CSV is appended to by bench32: carry the bench256 CSV in).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu.txt"

check() {
  python3 -m pytest -q -p no:cacheprovider tests/test_triton_backend.py 2>&1 | tee "$OUT/test_triton_cuda.log"
}

case "${1:-check}" in
  check) check ;;
  bench256)
    check
    python3 benchmarks/bench_gpu.py --batch 256 2>&1 | tee "$OUT/bench256.log"
    ;;
  bench32)
    python3 benchmarks/bench_gpu.py --batch 32 --append 2>&1 | tee "$OUT/bench32.log"
    ;;
  *) echo "usage: $0 check|bench256|bench32" >&2; exit 2 ;;
esac
for f in docs/benchmarks/cuda_batch_norm.csv docs/benchmarks/cuda_batch_norm.png docs/performance.md; do
  if [ -f "$f" ]; then cp "$f" "$OUT/"; fi
done
