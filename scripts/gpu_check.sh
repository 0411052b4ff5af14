#!/usr/bin/env bash
# The GPU check in one call (a few minutes): environment report, the parity tests with CUDA tensors
# (several gloo ranks sharing the one GPU, since NCCL refuses two ranks per device), and
# `plait bench gpu` (plait at world size 1 beside a plain PyTorch loop). Results go under $OUT.
#   OUT=gpu_results bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/env.txt"

# 1. parity with CUDA tensors (fp32, 5 steps, 1e-5), every parallel layout that has a parity test
tests=$(ls tests/test_dp.py tests/test_tensor_parallel.py tests/test_pipeline.py tests/test_hybrid.py 2>/dev/null)
PLAIT_TEST_DEVICE=cuda timeout "${PARITY_TIMEOUT:-240}" $PY -m pytest -q -k parity $tests 2>&1 | tee "$OUT/parity.txt"

# 2. single-GPU efficiency against plain PyTorch, 124M / 350M / 1.3B at T = 1024, compiled
timeout "${BENCH_TIMEOUT:-420}" $PY -m plait bench gpu --seq-len 1024 --presets "${PRESETS:-124m,350m,1.3b}" \
  --reps "${REPS:-5}" --steps "${STEPS:-8}" --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
