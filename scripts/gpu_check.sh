#!/usr/bin/env bash
# The GPU check in one call (about 7 minutes on one H200: the bench ~2, the rest side by side at most
# 4.5): environment report; `plait bench gpu` (plait at world size 1 beside a plain PyTorch loop)
# alone on the device; then, side by side,
# `plait train` end to end on the GPU, the parity tests with CUDA tensors in fp32 and in bf16
# (several gloo ranks sharing the one GPU, since NCCL refuses two ranks per device) and the parity
# matrix tables. Everything is written under $OUT as it finishes, so a cut-off run keeps what ran.
#   OUT=gpu_results bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
T0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
  $PY -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
  git log --oneline -1 2>/dev/null
} 2>&1 | tee "$OUT/env.txt"

# 1. single-GPU efficiency against plain PyTorch, 124M / 350M / 1.3B at T = 1024, compiled; alone on
#    the device, since everything below would disturb its timings
stamp "bench gpu"
timeout "${BENCH_TIMEOUT:-270}" $PY -m plait bench gpu --seq-len 1024 --presets "${PRESETS:-124m,350m,1.3b}" \
  --reps "${REPS:-5}" --steps "${STEPS:-8}" --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.txt" 2>&1
stamp "bench gpu: exit $?"; grep -v Warning "$OUT/bench_gpu.txt" | tail -30

# 2. the rest side by side (16 cores; tiny models, each rank's CUDA context on the one GPU)
tests="tests/test_dp.py tests/test_tensor_parallel.py tests/test_pipeline.py tests/test_hybrid.py tests/test_gpu_path.py"
LIM=${PARALLEL_TIMEOUT:-260}  # the compiled-blocks test compiles cold in three processes: it needed more than 190 s
train_args="model.preset=10m train.steps=30 train.compile=true train.dtype=bf16 train.val_every=0 log.plots=false log.progress=false"
stamp "train, parity fp32 / bf16, matrices"
for n in 1 2; do
  ( timeout "$LIM" $PY -m plait train --nproc $n --run-dir "$OUT/train_${n}rank" $train_args > "$OUT/train_${n}rank.txt" 2>&1
    echo "exit $?" >> "$OUT/train_${n}rank.txt" ) &
done
PLAIT_TEST_DEVICE=cuda timeout "$LIM" $PY -m pytest -q -p no:cacheprovider --basetemp=/tmp/plait_fp32 -k parity $tests > "$OUT/parity_fp32.txt" 2>&1 &
PLAIT_TEST_DEVICE=cuda PLAIT_TEST_DTYPE=bf16 timeout "$LIM" $PY -m pytest -q -p no:cacheprovider --basetemp=/tmp/plait_bf16 -k parity $tests \
  > "$OUT/parity_bf16.txt" 2>&1 &
for dt in fp32 bf16; do
  timeout "$LIM" $PY scripts/parity_matrix.py --device cuda --dtype $dt --out "$OUT/parity_matrix_cuda_$dt.md" \
    > "$OUT/parity_matrix_cuda_$dt.txt" 2>&1 &
done
wait
stamp "done"
for f in parity_fp32 parity_bf16; do echo "== $f"; tail -4 "$OUT/$f.txt"; done
for f in train_1rank train_2rank; do echo "== $f"; grep -E "^plait:|exit|Error" "$OUT/$f.txt" | tail -4; done
for dt in fp32 bf16; do echo "== matrix $dt"; grep -E "result:" "$OUT/parity_matrix_cuda_$dt.md" 2>/dev/null; done
