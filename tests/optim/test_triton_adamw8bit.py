"""The Triton 8-bit AdamW update == the PyTorch path, on CPU through the Triton interpreter
(``TRITON_INTERPRET=1``, in a child process: the variable must be set before the kernel is
decorated; skipped without triton). The CUDA comparison is in test_optim_gpu.py.

Tolerance: the PyTorch CPU path may contract ``m + w (g - m)`` into an FMA (ATen's vectorized
lerp) where the kernel does not, so values agree within a few fp32 ulps and a code may differ
where its value sits on a decision boundary: weights within 1e-6 relative over 6 steps, codes
equal on >= 99.9% of elements, block scales within 1e-6 relative."""

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
from solotune.optim import AdamW8bit
out = []
for shape in [(30, 300), (16, 512), (40, 80), (3, 4, 100)]:  # rows: a partial last block; whole blocks; shorter than a block; 3-D
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(shape)); b = torch.nn.Parameter(a.detach().clone())
    ref = AdamW8bit([a], lr=1e-2, weight_decay=0.1, min_8bit_size=0, kernel="torch")
    tri = AdamW8bit([b], lr=1e-2, weight_decay=0.1, min_8bit_size=0, kernel="triton")
    for _ in range(6):
        g = torch.randn(shape)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step(); tri.step()
    sa, sb = ref.state[a], tri.state[b]
    rel = lambda x, y: float(((x - y).abs() / y.abs().clamp_min(1e-30)).max())
    out.append({"shape": list(shape), "p_rel": float(((a - b).abs().max() / a.abs().max())),
                "m_codes": float((sa["m_codes"] == sb["m_codes"]).float().mean()),
                "v_codes": float((sa["v_codes"] == sb["v_codes"]).float().mean()),
                "m_absmax": rel(sb["m_absmax"], sa["m_absmax"]), "v_absmax": rel(sb["v_absmax"], sa["v_absmax"]),
                "dtypes": [str(sb[k].dtype) for k in ("m_codes", "m_absmax", "v_codes", "v_absmax")]})
print(json.dumps(out))
"""


def test_triton_update_equals_pytorch_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 4
    for row in rows:
        assert row["dtypes"] == ["torch.uint8", "torch.float32", "torch.uint8", "torch.float32"], row
        assert row["p_rel"] < 1e-6 and row["m_absmax"] < 1e-6 and row["v_absmax"] < 1e-6, row
        assert row["m_codes"] >= 0.999 and row["v_codes"] >= 0.999, row
