#!/usr/bin/env bash
# Issue 13: full fine-tuning of the 7B architecture (pure bf16, seq 512, checkpointing all) with
# 8-bit AdamW + optimizer in backward, with and without the optimizer state offloaded, and the
# course's Table 2 (16 cells, fp32 weights) under --memory-limit 80GiB, where every full
# fine-tuning cell gets the cheapest optimizer technique `plan` predicts to fit (--optimizer auto).
#
#   bash benchmarks/run_optim_h200.sh OUT full     # GPU tests (bitsandbytes from .whl/), plan, cells (a) (b): ~3 min
#   bash benchmarks/run_optim_h200.sh OUT table2   # the 16 Table 2 cells: ~5 min
#   bash benchmarks/run_optim_h200.sh OUT all      # both (~8 min: over one 10-minute device command only if slow)
#
# Logs and bench folders (cells.json with optimizer / optimizer_in_backward / offload per cell) go to OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT}; PART=${2:-all}
mkdir -p "$OUT"
source benchmarks/device_env.sh

full() {
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/optim/test_optim_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
  python3 -m solotune plan --model llama2-7b --gpu-mem 24GiB > "$OUT/plan-24gib.txt" 2>&1
  local B=(python3 -m solotune bench --model llama2-7b --axes none --fix gc=on,precision=on,lora=off
           --precision-on bf16 --optimizer adamw-8bit --optimizer-in-backward --time-budget 15)
  "${B[@]}" --out "$OUT/full-8bit-inbwd" 2>&1 | tee "$OUT/full-8bit-inbwd.console.log"               # (a)
  "${B[@]}" --offload optimizer --out "$OUT/full-8bit-inbwd-offload" 2>&1 | tee "$OUT/full-8bit-inbwd-offload.console.log"  # (b)
}

table2() {  # (c): GA x fp16 mixed precision x LoRA x checkpointing, fp32 weights, capped at 80 GiB
  # eager (--compile off): Table 2 is about what fits, and the planner's default model is the eager step;
  # compiling 16 cells would cost ~15 s each of device time for no change in what fits
  python3 -m solotune bench --model llama2-7b --memory-limit 80GiB --optimizer auto --time-budget 4 --compile off \
    --out "$OUT/table2-80gib" 2>&1 | tee "$OUT/table2-80gib.console.log"
}

case "$PART" in
  full) full ;;
  table2) table2 ;;
  all) full; table2 ;;
  *) echo "PART: full | table2 | all" >&2; exit 2 ;;
esac
