#!/usr/bin/env bash
# Issue 9 check on one H200: the architecture-seams refactor changes no result.
#
#   bash benchmarks/run_seams_h200.sh OUT PART      # PART: tests | new | old
#
#   tests  the CUDA tests (pytest -m gpu), before any measurement
#   new    this tree: the course cell (7B architecture, 200 Alpaca records, batch 1, accumulation 8,
#          LoRA r16 on wq,wv, pure bf16) and the micro-batch-8 cells (checkpointing off / all), each
#          with HF transformers + PEFT (--reference hf) in the same run
#   old    the same cells on the code before the refactor (git archive 9dc8a86 in .old-solotune/)
#
# The GPU machine has no network: gguf comes as a wheel in .whl/ (see the device notes), and the
# package runs from the tree with PYTHONPATH (not pip-installed). Logs and bench folders go to OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT}; PART=${2:?PART}
mkdir -p "$OUT"
source benchmarks/device_env.sh
SITE=/tmp/site

bench() {  # ROOT NAME ARGS...
  local root=$1 name=$2; shift 2
  (cd "$root" && PYTHONPATH="$root:$SITE" python3 -m solotune bench --model llama2-7b "$@" --out "$OUT/$name") \
    2>&1 | tee "$OUT/$name.console.log"
}
COURSE=(--axes none --fix ga=on,precision=on --precision-on bf16)
MB8=(--micro-batch 8 --axes gc --fix precision=on --precision-on bf16)
case "$PART" in
  tests) PYTHONPATH="$PWD:$SITE" python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" ;;
  new) bench "$PWD" course-new "${COURSE[@]}" --reference hf
       bench "$PWD" mb8-new "${MB8[@]}" --reference hf ;;
  old) bench "$PWD/.old-solotune" course-old "${COURSE[@]}"
       bench "$PWD/.old-solotune" mb8-old "${MB8[@]}" ;;
esac
