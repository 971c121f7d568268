#!/usr/bin/env bash
# Issue 14: fast generation on one H200. The GPU generation tests (Inductor + CUDA graphs == eager,
# no cudagraph skips, no recompilation), then bench_generate.py: Llama-2-7B architecture, random init,
# bf16, 256-token prompts + 256 new tokens, batch 1 and 16, solotune compiled / eager and HF generate.
# About 4 minutes (two 7B compiles of ~1 min each dominate; eager and HF are timed once each).
#
#   bash benchmarks/run_generate_h200.sh OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT}
mkdir -p "$OUT"
source benchmarks/device_env.sh
python3 -m pytest tests/test_generate_gpu.py -q -rs 2>&1 | tee "$OUT/tests.log"
python3 benchmarks/bench_generate.py --out "$OUT/gen" 2>&1 | tee "$OUT/bench.console.log"
