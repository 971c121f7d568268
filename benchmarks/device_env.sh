# Sourced by the benchmarks/run_*_h200.sh scripts: the GPU machine's set-up. It has no network, so
# missing packages (gguf; bitsandbytes for the parity tests) come as wheels in .whl/ and the package
# runs from the tree (PYTHONPATH), not pip-installed. Expects OUT; writes OUT/gpu.txt.
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site"
nvidia-smi > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" >> "$OUT/gpu.txt" 2>&1
