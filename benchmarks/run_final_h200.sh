#!/usr/bin/env bash
# The closing GPU measurements of this session, in parts with their own time limits; after each part
# everything under OUT is packed into OUT/results.tgz (files come back even if a later part is cut).
#
#   bash benchmarks/run_final_h200.sh OUT PART...
#   PART: tests | speed | qlora | probe | generate | optim | context24
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT}; shift
mkdir -p "$OUT/r"
export OUT
source benchmarks/device_env.sh
R="$OUT/r"
pack() { tar -czf "$OUT/results.tgz" -C "$R" . 2>/dev/null; }
for part in "$@"; do
  t0=$(date +%s)
  case "$part" in
    tests)
      timeout 100 python3 -m pytest -q -rs -p no:cacheprovider tests/train/test_speed_gpu.py tests/kernels/test_kernels_gpu.py \
        tests/bench/test_bench_gpu.py tests/optim/test_optim_gpu.py tests/test_generate_gpu.py tests/quant/test_quant_gpu.py \
        > "$R/gpu_tests.log" 2>&1 ;;
    speed)
      timeout 260 bash benchmarks/run_bench_h200.sh "$R/bench" speed > "$R/speed.log" 2>&1 ;;
    qlora)
      timeout 230 bash benchmarks/run_bench_h200.sh "$R/bench" qlora > "$R/qlora.log" 2>&1 ;;
    probe)
      timeout 150 python3 benchmarks/speed_probe.py --out "$R/probe" --warmup 3 --steps 4 \
        --variants compile-flce,compile-gc-flce,qlora-b8-compile-flce,lora-b1-graphs,qlora-b1-graphs > "$R/probe.log" 2>&1 ;;
    generate)
      timeout 240 python3 benchmarks/bench_generate.py --out "$R/gen" --repeats 2 > "$R/generate.log" 2>&1 ;;
    optim)
      timeout 200 bash benchmarks/run_optim_h200.sh "$R/optim" full > "$R/optim.log" 2>&1 ;;
    context24)
      timeout 200 bash benchmarks/run_bench_h200.sh "$R/bench" context24 > "$R/context24.log" 2>&1 ;;
    *) echo "unknown part $part" ;;
  esac
  echo "$part rc=$? $(( $(date +%s) - t0 )) s" | tee -a "$R/parts.log"
  pack
done
