#!/usr/bin/env bash
# Issue 10: QLoRA / int8 / offload as `solotune bench` cells (7B architecture, bf16, checkpointing all),
# with the planner's prediction and the measured anatomy per cell. No HF + bitsandbytes reference yet.
#
#   bash benchmarks/run_qlora_bench_h200.sh OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT}
mkdir -p "$OUT"
source benchmarks/device_env.sh
B=(python3 -m solotune bench --model llama2-7b --axes none --fix gc=on,precision=on --precision-on bf16 --time-budget 15)
"${B[@]}" --quantize nf4 --out "$OUT/nf4-b1" 2>&1 | tee "$OUT/nf4-b1.console.log"
"${B[@]}" --quantize nf4 --micro-batch 8 --out "$OUT/nf4-b8" 2>&1 | tee "$OUT/nf4-b8.console.log"
"${B[@]}" --quantize nf4 --micro-batch 8 --offload activations --out "$OUT/nf4-b8-offload" 2>&1 | tee "$OUT/nf4-b8-offload.console.log"
"${B[@]}" --quantize int8 --micro-batch 8 --out "$OUT/int8-b8" 2>&1 | tee "$OUT/int8-b8.console.log"
