#!/usr/bin/env bash
# Issue 11: the fused kernels and the linear cross-entropy losses on the GPU: parity tests first
# (Triton vs the PyTorch references at 7B shapes, fp32 and bf16; torch.compile; the 7B head; the
# planner vs the CUDA anatomy with the kernels and the new losses), then
# the micro-benchmark (each kernel vs eager vs torch.compile of the reference). ~2-3 minutes.
#
#   bash benchmarks/run_kernels_h200.sh OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT}
mkdir -p "$OUT"
source benchmarks/device_env.sh
python3 -m pytest -q tests/kernels/test_kernels_gpu.py tests/kernels/test_kernels.py tests/train/test_loss.py \
  tests/bench/test_plan_losses.py \
  2>&1 | tee "$OUT/kernels_tests.log"
python3 benchmarks/kernels_time.py "$OUT/kernels_time.json" 2>&1 | tee "$OUT/kernels_time.log"
