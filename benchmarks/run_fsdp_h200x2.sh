#!/usr/bin/env bash
# Issue 5 measurements: FSDP2 data parallelism on 2 x H200 (nvidia-h200-x2).
#
#   bash benchmarks/run_fsdp_h200x2.sh [OUT]          # OUT defaults to benchmarks/results/fsdp-h200x2
#
# Cells (random weights of the named architecture; the bundled Alpaca sample, LLaMA-2 tokenizer):
#   7B LoRA and 7B full fine-tuning at the SAME PER-GPU BATCH on
#     1 GPU, plain loop (--distributed none)        <- the baseline of `scaling`
#     1 GPU, FSDP group of one                       <- FSDP's own overhead, no communication
#     2 GPUs, FSDP (global batch = 2 x per-GPU)      -> scaling = tokens/s / baseline tokens/s (target >= 1.9)
#   70B-architecture LoRA in bf16 (unquantized), sharded over 2 GPUs: peak memory per GPU, tokens/s
#     (no 1-GPU baseline: 138 GB of bf16 weights do not fit one GPU)
# Every cell: raw log OUT/<cell>/log.txt, run folder OUT/<cell>/run/ (metrics.jsonl, summary.json);
# then OUT/cells.json + OUT/results.md (benchmarks/fsdp_cells.py: steady-state tokens/s after
# WARMUP steps, world_size, per-rank peaks, scaling).
#
# Overridable (environment): PRECISION (bf16: bf16 weights, fp32 LoRA adapters), BATCH_7B and
# BATCH_70B (per GPU), GRAD_ACCUM, STEPS_7B, STEPS_70B, WARMUP, SEQ, GC_70B, NPROC, DEVICE,
# CELL_TIMEOUT (s), CELLS (space-separated glob patterns of cell names, default all: the estimate
# for all 7 cells is ~6 min on 2 x H200; to stay inside a 10-minute command, run e.g.
# CELLS='7b-lora-*' then CELLS='7b-full-*' then CELLS='70b-*' into the same OUT: every call
# re-collects all cells present in OUT).
# DRY_RUN=1: the same commands on the CPU with gloo and 1-layer models, a few steps (checks the
# code path, measures nothing).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/fsdp-h200x2}
mkdir -p "$OUT"

# NVLink SHARP / multicast off in every process (solotune also sets these unless already set).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONUNBUFFERED=1

PRECISION=${PRECISION:-bf16}
BATCH_7B=${BATCH_7B:-8}      # examples per GPU per micro-batch
BATCH_70B=${BATCH_70B:-2}
GRAD_ACCUM=${GRAD_ACCUM:-1}
STEPS_7B=${STEPS_7B:-30}
STEPS_70B=${STEPS_70B:-12}
WARMUP=${WARMUP:-5}          # steps left out of the steady-state rate (allocator, NCCL, kernels warm up)
SEQ=${SEQ:-512}
GC_70B=${GC_70B:-all}
NPROC=${NPROC:-2}
DEVICE=${DEVICE:-cuda}
CELL_TIMEOUT=${CELL_TIMEOUT:-900}
CELLS=${CELLS:-*}
LAYERS=()
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  DEVICE=cpu; LAYERS=(--n-layers 1); BATCH_7B=1; BATCH_70B=1; STEPS_7B=3; STEPS_70B=2; WARMUP=1; SEQ=128
  export OMP_NUM_THREADS=1
fi

COMMON=(--random-init --data alpaca-sample --train-range 0:200 --max-seq-len "$SEQ" --val-samples 0
        --no-generate --no-progress --no-save --log-every 1 --seed 0 --lr 1e-5 --warmup-steps 0
        --lr-schedule constant --grad-accum "$GRAD_ACCUM" --device "$DEVICE" --precision "$PRECISION"
        --overwrite "${LAYERS[@]}")

{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; nvidia-smi topo -m 2>/dev/null; } > "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', \
torch.cuda.nccl.version() if torch.cuda.is_available() else None)" >> "$OUT/gpu.txt" 2>&1

# cell NAME NPROC|none FLAGS...: NPROC=none runs the plain single-process loop; a number runs
# torchrun with that many processes and --distributed fsdp.
cell() {
  local name=$1 nproc=$2; shift 2
  local pattern wanted=0 patterns
  read -r -a patterns <<< "$CELLS"  # split on spaces without expanding the globs against files
  for pattern in "${patterns[@]}"; do
    # shellcheck disable=SC2053  # glob match on purpose
    [[ $name == $pattern ]] && wanted=1
  done
  [[ $wanted == 1 ]] || return 0
  local dir="$OUT/$name"
  rm -rf "$dir"; mkdir -p "$dir"
  local cmd
  if [[ "$nproc" == none ]]; then
    cmd=(python -m solotune finetune "${COMMON[@]}" --output-dir "$dir/run" --distributed none "$@")
  else
    cmd=(python -m torch.distributed.run --standalone --nproc-per-node "$nproc"
         -m solotune finetune "${COMMON[@]}" --output-dir "$dir/run" --distributed fsdp "$@")
  fi
  echo "== $name: ${cmd[*]}" | tee -a "$OUT/bench.log"
  printf '%s\n' "${cmd[*]}" > "$dir/cmd.txt"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=60 "$CELL_TIMEOUT" "${cmd[@]}" > "$dir/log.txt" 2>&1
  local rc=$?
  echo "$rc" > "$dir/rc.txt"
  echo "   rc=$rc in $((SECONDS - t0)) s; last lines:" | tee -a "$OUT/bench.log"
  tail -n 3 "$dir/log.txt" | sed 's/^/   | /' | tee -a "$OUT/bench.log"
}

# ---- 7B: same per-GPU batch on 1 and 2 GPUs
for method in lora full; do
  if [[ $method == lora ]]; then M=(--lora-rank 16 --lora-alpha 32 --lora-dropout 0.05 --lora-targets wq,wv)
  else M=(--full); fi
  cell "7b-$method-1gpu"        none      --model llama2-7b --batch-size "$BATCH_7B" --max-steps "$STEPS_7B" "${M[@]}"
  cell "7b-$method-fsdp1"       1         --model llama2-7b --batch-size "$BATCH_7B" --max-steps "$STEPS_7B" "${M[@]}"
  cell "7b-$method-fsdp$NPROC"  "$NPROC"  --model llama2-7b --batch-size $((BATCH_7B * NPROC)) --max-steps "$STEPS_7B" "${M[@]}"
done

# ---- 70B architecture, LoRA, bf16 weights sharded over the GPUs
cell "70b-lora-fsdp$NPROC" "$NPROC" --model llama2-70b --batch-size $((BATCH_70B * NPROC)) --max-steps "$STEPS_70B" \
  --lora-rank 16 --lora-alpha 32 --lora-dropout 0.05 --lora-targets wq,wv --grad-checkpoint "$GC_70B"

python benchmarks/fsdp_cells.py "$OUT" --warmup "$WARMUP" | tee -a "$OUT/bench.log"
