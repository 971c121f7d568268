#!/usr/bin/env bash
# The closing GPU measurements of this session, in parts with their own time limits; after each part
# everything under OUT is packed into OUT/results.tgz (files come back even if a later part is cut).
#
#   bash benchmarks/run_final_h200.sh OUT PART...
#   PART: tests | kernels | speed | speed-flce | qlora | qlora-flce | probe | probe-k | gen1 | gen16 |
#         gen1-int8 | generate | alpaca | qlora-lean | optim | table2 | context24 | context80 |
#         context24-lean | context80-lean | profile-b1 | int8-code | alpaca-graphs | guide | tests3 | tests4 | tests5 | tests6 |
#         tests7 | probe-fp8 | fp8 | tests8 | probe-nf4fp8 | nf4-fp8 | fp8-lean-gc | qlora-b1-fp8 | tests9 | snapshot-b1
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
    kernels)
      timeout 170 bash benchmarks/run_kernels_h200.sh "$R/kernels" > "$R/kernels.log" 2>&1 ;;
    probe-cl)
      timeout 300 python3 benchmarks/speed_probe.py --out "$R/probe" --warmup 3 --steps 4 \
        --variants compile-cl,compile-gc-cl,qlora-b8-compile-cl,qlora-b1-compile-cl,compile-flce \
        > "$R/probe-cl.log" 2>&1 ;;
    tests3)  # every single-GPU test file, one at a time, verbose: a slow or hanging test shows by name (<= 12 min)
      for f in tests/test_generate_gpu.py:150 tests/optim/test_optim_gpu.py:60 tests/kernels/test_kernels_gpu.py:90 \
               tests/bench/test_plan_losses.py:60 tests/train/test_speed_gpu.py:60 tests/train/test_train_gpu.py:60 \
               tests/train/test_offload.py:60 tests/bench/test_bench_gpu.py:90 tests/quant/test_quant_gpu.py:90; do
        timeout "${f##*:}" python3 -m pytest -v -rs -p no:cacheprovider --durations=8 "${f%%:*}" >> "$R/gpu_tests3.log" 2>&1
        echo "${f%%:*} rc=$?" >> "$R/gpu_tests3.log"
      done ;;
    tests5)  # this session's graph-replay and segment-padding changes, and the rewritten long-row offload test
      for f in tests/train/test_train_gpu.py:120 tests/train/test_speed_gpu.py:90 tests/train/test_offload.py:60; do
        timeout "${f##*:}" python3 -m pytest -v -rs -p no:cacheprovider --durations=8 "${f%%:*}" >> "$R/gpu_tests5.log" 2>&1
        echo "${f%%:*} rc=$?" >> "$R/gpu_tests5.log"
      done ;;
    tests7)  # the fp8 base (scaled_mm == reference path, Inductor-compiled blocks), then the graph-replay and speed files
      for f in tests/quant/test_quant_gpu.py:120 tests/train/test_train_gpu.py:120 tests/train/test_speed_gpu.py:90; do
        timeout "${f##*:}" python3 -m pytest -v -rs -p no:cacheprovider --durations=8 "${f%%:*}" >> "$R/gpu_tests7.log" 2>&1
        echo "${f%%:*} rc=$?" >> "$R/gpu_tests7.log"
      done ;;
    probe-fp8)  # the fp8 base in the speed probe: compiled mb8 with and without checkpointing, and bf16 beside it
      timeout 300 python3 benchmarks/speed_probe.py --out "$R/probe" --warmup 3 --steps 5 \
        --variants fp8-compile-cl,compile-cl,fp8-compile-gc-cl,compile-gc-cl --profile fp8-compile-cl > "$R/probe-fp8.log" 2>&1 ;;
    tests8)  # the quantized bases on the GPU (nf4-fp8's Triton conversion, compiled and checkpointed fp8 blocks)
      timeout 200 python3 -m pytest -v -rs -p no:cacheprovider --durations=8 tests/quant/test_quant_gpu.py \
        > "$R/gpu_tests8.log" 2>&1 ;;
    snapshot-b1)  # issue 10's QLoRA b1 nf4-fp8 cell: the allocator's blocks alive at the peak, by site (planner -3%)
      timeout 200 python3 benchmarks/speed_probe.py --out "$R/probe" --warmup 3 --steps 2 \
        --variants qlora-fp8-b1-compile-flce --memory-snapshot qlora-fp8-b1-compile-flce > "$R/snapshot-b1.log" 2>&1
      timeout 60 python3 -m pytest -q -rs -p no:cacheprovider tests/bench/test_snapshot.py >> "$R/snapshot-b1.log" 2>&1 ;;
    tests9)  # host copies in pinned pieces (offload), the in-place logsumexp loss's CUDA peak, the quantized bases
      for f in tests/train/test_offload.py:90 tests/train/test_loss.py:90 tests/quant/test_quant_gpu.py:120; do
        timeout "${f##*:}" python3 -m pytest -v -rs -p no:cacheprovider --durations=8 "${f%%:*}" >> "$R/gpu_tests9.log" 2>&1
        echo "${f%%:*} rc=$?" >> "$R/gpu_tests9.log"
      done ;;
    probe-nf4fp8)  # QLoRA mb8 + checkpointing, compiled: NF4 multiplied in fp8 vs in bf16, one process
      timeout 200 python3 benchmarks/speed_probe.py --out "$R/probe" --warmup 3 --steps 5 \
        --variants qlora-fp8-b8-compile-cl,qlora-b8-compile-cl --profile qlora-fp8-b8-compile-cl > "$R/probe-nf4fp8.log" 2>&1 ;;
    nf4-fp8|fp8-lean-gc|qlora-b1-fp8)
      timeout 240 bash benchmarks/run_bench_h200.sh "$R/bench" "$part" > "$R/$part.log" 2>&1 ;;
    fp8)
      timeout 330 bash benchmarks/run_bench_h200.sh "$R/bench" fp8 > "$R/fp8.log" 2>&1 ;;
    tests6)  # the graph-replay training test again (validation now runs the blocks eagerly)
      timeout 120 python3 -m pytest -v -rs -p no:cacheprovider tests/train/test_train_gpu.py -k graph_replayed \
        > "$R/gpu_tests6.log" 2>&1 ;;
    tests4)  # the test files whose code changed since their last GPU run (8-bit row kernel, padded head dims, offload, bench)
      for f in tests/optim/test_optim_gpu.py:60 tests/bench/test_plan_losses.py:60 tests/train/test_offload.py:60 \
               tests/bench/test_bench_gpu.py:90; do
        timeout "${f##*:}" python3 -m pytest -v -rs -p no:cacheprovider --durations=8 "${f%%:*}" >> "$R/gpu_tests4.log" 2>&1
        echo "${f%%:*} rc=$?" >> "$R/gpu_tests4.log"
      done ;;
    tests2)
      timeout 130 python3 -m pytest -q -rs -p no:cacheprovider --durations=12 tests/test_generate_gpu.py tests/optim/test_optim_gpu.py \
        tests/train/test_speed_gpu.py tests/bench/test_plan_losses.py > "$R/gpu_tests2.log" 2>&1 ;;
    probe-k)
      timeout 200 python3 benchmarks/speed_probe.py --out "$R/probe" --warmup 3 --steps 4 \
        --variants compile-flce,compile-flce-k,compile-gc-flce,compile-gc-flce-k,qlora-b8-compile-flce,qlora-b8-compile-flce-k,qlora-b1-compile-flce \
        > "$R/probe-k.log" 2>&1 ;;
    gen1)  # batch 1: GEMV-tuned CUDA graphs (the new default) vs plain reduce-overhead vs HF, one process
      timeout 300 python3 benchmarks/bench_generate.py --out "$R/gen1" --batches 1 --methods compiled,compiled-cublas,hf \
        --repeats 3 > "$R/gen1.log" 2>&1 ;;
    gen1-int8)  # int8 weight-only decoding vs bf16, same weights, one process
      timeout 300 python3 benchmarks/bench_generate.py --out "$R/gen1-int8" --batches 1,16 --methods compiled,compiled-int8 \
        --repeats 3 > "$R/gen1-int8.log" 2>&1 ;;
    gen16)
      timeout 200 python3 benchmarks/bench_generate.py --out "$R/gen16" --batches 16 --methods compiled,hf \
        --repeats 3 > "$R/gen16.log" 2>&1 ;;
    alpaca)
      timeout 330 bash benchmarks/run_bench_h200.sh "$R/bench" alpaca > "$R/alpaca.log" 2>&1 ;;
    alpaca-graphs)
      timeout 150 bash benchmarks/run_bench_h200.sh "$R/bench" alpaca-graphs > "$R/alpaca-graphs.log" 2>&1 ;;
    speed-flce)
      OPTS="--loss fused-linear-ce ${KOPTS:-}" timeout 260 bash benchmarks/run_bench_h200.sh "$R/bench-flce" speed > "$R/speed-flce.log" 2>&1 ;;
    qlora-lean)
      timeout 200 bash benchmarks/run_bench_h200.sh "$R/bench" qlora-lean > "$R/qlora-lean.log" 2>&1 ;;
    qlora-flce)
      OPTS="--loss fused-linear-ce ${KOPTS:-}" timeout 230 bash benchmarks/run_bench_h200.sh "$R/bench-flce" qlora > "$R/qlora-flce.log" 2>&1 ;;
    table2)
      timeout 400 bash benchmarks/run_optim_h200.sh "$R/optim" table2 > "$R/table2.log" 2>&1 ;;
    context80)
      timeout 450 bash benchmarks/run_bench_h200.sh "$R/bench" context80 > "$R/context80.log" 2>&1 ;;
    guide)
      timeout 300 bash benchmarks/run_guide_h200.sh "$R/guide" > "$R/guide.log" 2>&1 ;;
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
    context24-lean)
      timeout 330 bash benchmarks/run_bench_h200.sh "$R/bench" context24-lean > "$R/context24-lean.log" 2>&1 ;;
    context80-lean)
      timeout "${PART_TIMEOUT:-480}" bash benchmarks/run_bench_h200.sh "$R/bench" context80-lean > "$R/context80-lean.log" 2>&1 ;;
    int8-code)  # what Inductor makes of the int8 decode step (is the int8 -> bf16 cast fused into the GEMV?), 2 layers
      TORCH_LOGS=output_code timeout 200 python3 benchmarks/bench_generate.py --out "$R/int8-code" --layers 2 --batches 1 \
        --methods compiled-int8 --repeats 1 --new-tokens 16 > "$R/int8-code.log" 2>&1 ;;
    profile-b1)  # where a batch-1 compiled step's time goes (the course setting is ~4x slower per row than mb8)
      timeout 200 python3 benchmarks/speed_probe.py --out "$R/probe" --warmup 3 --steps 4 \
        --variants lora-b1-compile,lora-b1-graphs,compile-cl --profile lora-b1-compile,lora-b1-graphs > "$R/profile-b1.log" 2>&1 ;;
    *) echo "unknown part $part" ;;
  esac
  echo "$part rc=$? $(( $(date +%s) - t0 )) s" | tee -a "$R/parts.log"
  pack
done
