#!/usr/bin/env bash
# The CPU benchmarks recorded in docs/benchmarks.md, run serially (one at a time: the machine is small).
# Each writes docs/results/<name>.json and a log; the slow-network ones need root (network namespaces).
#   bash scripts/run_benchmarks.sh            # all
#   bash scripts/run_benchmarks.sh dp tp      # some
set -uo pipefail
cd "$(dirname "$0")/.."
P=.venv/bin/plait
OUT=docs/results
mkdir -p "$OUT"
run() { local name=$1; shift; echo "== $name: $*"; /usr/bin/time -f "$name: %e s" "$@" 2>&1 | grep -v '^W1[0-9]\{3\}' | tee "$OUT/$name.log"; }
sel=("$@")
has() { [ ${#sel[@]} -eq 0 ] && return 0; for s in "${sel[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

has dp && run bench_dp $P bench dp --ranks 2,4 --preset 10m --reps 5 --steps 6 --json $OUT/bench_dp.json
has tp && run bench_tp $P bench tp --ranks 2,4 --preset 10m --reps 5 --steps 6 --json $OUT/bench_tp.json
has pp && run bench_pp $P bench pp --ranks 2,4 --preset 10m --reps 5 --steps 2 --simulate --json $OUT/bench_pp.json
has zero && run bench_zero $P bench zero --ranks 2 --preset 10m --reps 3 --steps 4 --json $OUT/bench_zero.json
has hf && run bench_hf $P bench hf --ranks 2 --reps 5 --steps 5 --json $OUT/bench_hf.json
has compression && run bench_compression_100mbit $P bench compression --bandwidth 100mbit --ranks 4 --preset tiny \
  --batch 4 --seq-len 64 --steps 60 --reps 1 --json $OUT/bench_compression_100mbit.json
has compression && run bench_compression_1gbit $P bench compression --bandwidth 1gbit --ranks 4 --preset tiny \
  --batch 4 --seq-len 64 --steps 60 --reps 1 --json $OUT/bench_compression_1gbit.json
has sync && run bench_sync_10mbit $P bench sync --bandwidth 10mbit --ranks 4 --preset tiny --batch 4 --seq-len 64 \
  --steps 100 --every 10 --reps 1 --json $OUT/bench_sync_10mbit.json
has compression_quality && run compression_quality .venv/bin/python scripts/compression_quality.py --ranks 4 \
  --preset tiny --steps 150 --seq-len 64 --out-dir $OUT/compression_quality
has sync_quality && run sync_quality .venv/bin/python scripts/sync_quality.py --nproc 4 --preset tiny --steps 300 \
  --every 50 --seq-len 64 --runs runs/sync_quality --out $OUT/sync_quality
exit 0
