#!/usr/bin/env bash
# Issue 11 exploration on one H200: the speed-option GPU tests, then the probe variants.
#   bash benchmarks/run_speed_probe_h200.sh OUT [VARIANTS] [PROFILE]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT}
mkdir -p "$OUT"
source benchmarks/device_env.sh
python3 -m pytest tests/train/test_speed_gpu.py tests/data/test_packing.py tests/train/test_speed_options.py -q -x \
  -p no:cacheprovider 2>&1 | tail -25 > "$OUT/tests.log"
python3 benchmarks/speed_probe.py --out "$OUT" --variants "${2:-eager,compile,eager-gc,compile-gc,compile-sel,qlora-b1,qlora-b8}" \
  --profile "${3:-eager,qlora-b1}" 2>&1 | tail -60 > "$OUT/probe.log"
