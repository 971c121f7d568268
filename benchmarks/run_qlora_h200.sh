#!/usr/bin/env bash
# Issue 10, first GPU look (not the bench matrix): the quantized bases' CUDA tests (Triton == PyTorch,
# our NF4 bytes == bitsandbytes'), then 7B-architecture QLoRA / int8 / offload runs through
# `solotune finetune` (random init, bundled Alpaca 0-199, <= 512 tokens, pure bf16, checkpointing all).
#
#   bash benchmarks/run_qlora_h200.sh OUT
#
# Each run's summary.json lands in OUT/<name>/; benchmarks/qlora_runs.py collects them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT}
mkdir -p "$OUT"
source benchmarks/device_env.sh
python3 -m pytest -q -m gpu -p no:cacheprovider tests/quant tests/train/test_offload.py 2>&1 | tee "$OUT/gpu_tests.log"

run() {  # NAME FLAGS...
  local name=$1; shift
  timeout 240 python3 -m solotune finetune --model llama2-7b --random-init --precision bf16 --grad-checkpoint all \
    --max-seq-len 512 --grad-accum 1 --lr 1e-4 --no-save --no-generate --no-progress --log-every 5 \
    --val-samples 0 --output-dir "$OUT/$name" "$@" 2>&1 | tee "$OUT/$name.log" | tail -4
}
run qlora-b1 --quantize nf4 --batch-size 1 --max-steps 40
run qlora-b8 --quantize nf4 --batch-size 8 --max-steps 25
run int8-b8 --quantize int8 --batch-size 8 --max-steps 25
run lora-b8 --batch-size 8 --max-steps 25
run qlora-b8-offload --quantize nf4 --batch-size 8 --max-steps 25 --offload activations
python3 benchmarks/qlora_runs.py "$OUT" | tee "$OUT/results.md"
