"""The Triton NF4 dequantization kernel == the PyTorch path, on CPU through the Triton
interpreter (``TRITON_INTERPRET=1``; skipped when triton is not installed). The GPU version of
this comparison is in test_quant_gpu.py.

The interpreter has to be on when the kernel is decorated, so the comparison runs in a child
process with the variable set (the test session may already have imported the module without it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, torch
from solotune.quant.nf4 import quantize_nf4, dequantize_nf4_torch
from solotune.quant.triton_nf4 import dequantize_nf4_triton

def toward_zero_bf16(f):  # what the interpreter's fp32 -> bf16 cast does (numpy has no bf16)
    return (f.view(torch.int32) & ~0xFFFF).view(torch.float32).bfloat16()

out = []
g = torch.Generator().manual_seed(0)
for shape in [(96, 200), (7, 13), (64, 1024)]:   # 300 blocks = 2 scale groups; odd; whole groups
    w = torch.randn(shape, generator=g) * 0.03
    q = quantize_nf4(w)
    ref32 = dequantize_nf4_torch(q, torch.float32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ref = dequantize_nf4_torch(q, dtype)
        got = dequantize_nf4_triton(q, dtype, block=128)
        row = {"shape": list(shape), "dtype": str(dtype), "equal": bool(torch.equal(got, ref)),
               "got_dtype": str(got.dtype), "got_shape": list(got.shape)}
        if dtype == torch.bfloat16:
            row["equal_or_toward_zero"] = bool(((got == ref) | (got == toward_zero_bf16(ref32))).all())
        out.append(row)
print(json.dumps(out))
"""


def test_triton_kernel_equals_pytorch_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 9
    for row in rows:
        assert row["got_dtype"] == row["dtype"] and row["got_shape"] == row["shape"], row
        if row["dtype"] == "torch.bfloat16":
            # fp32 and fp16 are exact: every index, nibble and scale is right; the interpreter
            # rounds fp32 -> bf16 toward zero where the GPU rounds to nearest (exact there: GPU test).
            assert row["equal"] or row["equal_or_toward_zero"], row
        else:
            assert row["equal"], row


CHILD_FP8 = r"""
import json, torch
from solotune.quant.nf4 import quantize_nf4, dequantize_nf4_torch
from solotune.quant.nf4_fp8 import nf4_row_scales
from solotune.quant.triton_nf4 import nf4_to_fp8_triton

out = []
g = torch.Generator().manual_seed(0)
for shape in [(96, 200), (70, 130), (64, 1024)]:   # blocks spanning rows; tiles past both edges; whole groups
    q = quantize_nf4(torch.randn(shape, generator=g) * 0.03)
    scale, inv = nf4_row_scales(q)
    ref = dequantize_nf4_torch(q, torch.float32) * inv[:, None]
    for transpose in (False, True):
        got = nf4_to_fp8_triton(q, inv, transpose, dtype=torch.float32, block=(32, 64))
        want = ref.t().contiguous() if transpose else ref
        out.append({"shape": list(shape), "transpose": transpose, "equal": bool(torch.equal(got, want))})
print(json.dumps(out))
"""


def test_triton_nf4_to_fp8_values_equal_pytorch_under_the_interpreter():
    """The fused NF4 -> e4m3 kernel's values before their fp8 rounding (an fp32 output; the interpreter's fp8
    cast is not the GPU's: the rounding itself is compared on the GPU, test_quant_gpu.py) equal PyTorch's
    dequantized weight times the rows' 1 / scale, bit for bit, in both layouts."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", CHILD_FP8], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 6 and all(row["equal"] for row in rows), rows
