#!/usr/bin/env bash
# Issue 12 (the technique guide): the numbers docs/guide.md still lacks, on one H200 (< ~5 minutes).
#
#   bash benchmarks/run_guide_h200.sh OUT
#   then copy OUT to benchmarks/results/guide-h200/ and re-render: python3 benchmarks/render_guide.py
#
# gc-off, gc-every1 ... gc-every8: checkpointing's memory/compute trade, one `solotune bench` cell
#   each (Llama-2-7B architecture, random init, LoRA r16 on wq,wv, pure bf16, micro-batch 8, no
#   accumulation; every:K recomputes blocks 0, K, 2K, ...: every:1 = all, every:6 ~ sqrt(32);
#   selective: every block, pointwise ops only);
#   each cell trains for --time-budget seconds and its runtime is extrapolated to the 200 records.
# probes: a forward's peak with and without grad, and the KV cache's bytes and decode time
#   (benchmarks/guide_probes.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT}
mkdir -p "$OUT"
source benchmarks/device_env.sh
B=(python3 -m solotune bench --model llama2-7b --axes none --precision-on bf16 --micro-batch 8 --time-budget 8)
"${B[@]}" --fix gc=off,precision=on --out "$OUT/gc-off" 2>&1 | tee "$OUT/gc-off.console.log"
for K in 1 2 4 6 8; do
  "${B[@]}" --fix gc=on,precision=on --gc-on "every:$K" --out "$OUT/gc-every$K" 2>&1 | tee "$OUT/gc-every$K.console.log"
done
"${B[@]}" --fix gc=on,precision=on --gc-on selective --out "$OUT/gc-selective" 2>&1 | tee "$OUT/gc-selective.console.log"
python3 benchmarks/guide_probes.py --out "$OUT/probes" 2>&1 | tee "$OUT/probes.console.log"
