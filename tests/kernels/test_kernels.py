"""The fused Triton kernels == their PyTorch references (model.py's code), values and gradients:
on CPU through the Triton interpreter (``TRITON_INTERPRET=1``, in a child process because the
variable must be set before the kernels are decorated), and the swap into a model, which on CPU
without the interpreter must leave the model's arithmetic exactly as it was. The CUDA versions of
these comparisons are in test_kernels_gpu.py."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from solotune.config import ModelConfig
from solotune.data.batch import Batch
from solotune.kernels import apply_kernels, use_fused_kernels
from solotune.model import build_model
from solotune.peft import apply_lora
from solotune.train.loss import full_logits_loss

REPO = Path(__file__).resolve().parents[2]
CFG = ModelConfig(name="k", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48, max_seq_len=64)
FP32_TOL = 1e-5  # relative to the largest reference value: summation order only
# The interpreter rounds fp32 -> bf16 toward zero (numpy has no bf16), the reference to nearest:
# a result rounded twice on the way may differ by two bf16 ulps (2^-7 relative at worst each).
BF16_TOL_INTERPRETER = 4 * 2.0**-7


def _batch() -> Batch:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, CFG.vocab_size, (2, 10), generator=g)
    return Batch(input_ids=ids, labels=ids.clone(), positions=torch.arange(10).expand(2, 10).contiguous(),
                 seq_lens=((10,), (10,)))


def _loss_and_grads(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(batch, head=functools.partial(full_logits_loss, labels=batch.labels))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_swap_counts_and_cpu_fallback_is_the_reference():
    """Without the interpreter a CPU model keeps the reference arithmetic bit for bit (LoRA on)."""
    ref = build_model(CFG, seed=0)
    apply_lora(ref, ("wq", "wv"), 4, 8, 0.0, generator=torch.Generator().manual_seed(0))
    fused = build_model(CFG, seed=0)
    apply_lora(fused, ("wq", "wv"), 4, 8, 0.0, generator=torch.Generator().manual_seed(0))
    assert use_fused_kernels(fused) == {"rmsnorm": 2 * CFG.n_layers + 1, "swiglu": CFG.n_layers, "rope": CFG.n_layers}
    assert apply_kernels(build_model(CFG, seed=0), "off") == {}
    with pytest.raises(ValueError, match="unknown kernel set"):
        apply_kernels(fused, "cuda-graphs")
    batch = _batch()
    (l0, g0), (l1, g1) = _loss_and_grads(ref, batch), _loss_and_grads(fused, batch)
    assert torch.equal(l0, l1) and g0.keys() == g1.keys()
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


CHILD = r"""
import functools, json, sys, torch
sys.path.insert(0, "tests/kernels")
sys.path.insert(0, "tests")
from kernel_cases import rmsnorm_case, swiglu_case, rope_case
f32, bf16 = torch.float32, torch.bfloat16
out = {
    "rmsnorm fp32": rmsnorm_case(6, 40, f32, f32, "cpu"),          # odd width: a masked row tail
    "rmsnorm bf16 x, fp32 weight": rmsnorm_case(10, 40, bf16, f32, "cpu"),  # 10 rows over 4 programs: a ragged last one
    "rmsnorm bf16": rmsnorm_case(4, 64, bf16, bf16, "cpu"),
    "swiglu fp32": swiglu_case(5, 37, f32, "cpu"),
    "swiglu bf16": swiglu_case(5, 37, bf16, "cpu"),
    "rope fp32": rope_case(2, 3, 4, 8, f32, f32, "cpu"),
    "rope bf16 x, fp32 angles": rope_case(2, 3, 4, 8, bf16, f32, "cpu"),
    "rope bf16": rope_case(2, 3, 2, 16, bf16, bf16, "cpu"),
}
# the whole model, every parameter trainable, fp32: kernels swapped in vs not
from test_kernels import CFG, _batch, _loss_and_grads
from solotune.kernels import use_fused_kernels
from solotune.model import build_model
ref = build_model(CFG, seed=0).requires_grad_(True)
fused = build_model(CFG, seed=0).requires_grad_(True)
use_fused_kernels(fused)
(l0, g0), (l1, g1) = _loss_and_grads(ref, _batch()), _loss_and_grads(fused, _batch())
out["model"] = {"loss": abs(float(l1 - l0)) / abs(float(l0)), "same_params": float(g0.keys() == g1.keys()),
                **{n: float((g1[n] - g0[n]).abs().max() / g0[n].abs().max()) for n in g0}}
# torch.compile: the custom ops' fake and autograd implementations trace in one graph (aot_eager:
# no C++ compiler needed; the GPU test compiles with Inductor)
from solotune.kernels.rmsnorm import rms_norm
from solotune.kernels.rope import rope
from solotune.kernels.swiglu import swiglu
from solotune.model import rope_cos_sin
x = torch.randn(2, 8, 4, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
w = torch.linspace(0.5, 1.5, 32, requires_grad=True)
cos, sin = rope_cos_sin(torch.arange(8).expand(2, 8), 8, 10000.0, f32)
def f(x, w):
    r = rope(x, cos, sin).flatten(-2)
    return swiglu(rms_norm(r, w, 1e-5), r).square().sum()
eager = f(x, w)
ge = torch.autograd.grad(eager, (x, w))
compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w)
gc = torch.autograd.grad(compiled, (x, w))
out["compiled"] = {"y": float((compiled - eager).abs() / eager.abs()),
                   **{f"grad{i}": float((a - b).abs().max() / b.abs().max()) for i, (a, b) in enumerate(zip(gc, ge))}}
# compiled blocks with the kernels swapped in (the loop's --kernels triton --compile blocks)
torch._dynamo.reset()
blocks = build_model(CFG, seed=0).requires_grad_(True)
use_fused_kernels(blocks)
blocks.compile_blocks(backend="aot_eager", fullgraph=True)
l2, g2 = _loss_and_grads(blocks, _batch())
out["compiled blocks"] = {"loss": abs(float(l2 - l0)) / abs(float(l0)),
                          **{n: float((g2[n] - g0[n]).abs().max() / g0[n].abs().max()) for n in g0}}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, float]]:
    pytest.importorskip("triton")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's too
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["rmsnorm fp32", "rmsnorm bf16 x, fp32 weight", "rmsnorm bf16", "swiglu fp32",
                                  "swiglu bf16", "rope fp32", "rope bf16 x, fp32 angles", "rope bf16"])
def test_kernel_equals_reference_under_the_interpreter(interpreted, case):
    res = interpreted[case]
    tol = FP32_TOL if case.endswith("fp32") else BF16_TOL_INTERPRETER
    for key, v in res.items():
        if key.endswith("dtype_ok"):
            assert v == 1.0, (case, key)
        else:
            assert v <= tol, (case, key, v)
    if case.startswith("rope") and "fp32 angles" in case or case == "rope fp32":
        # the output is fp32: every product and sum rounded as the reference does, fusion off
        assert res["y"] == 0.0, res


def test_model_with_kernels_under_the_interpreter(interpreted):
    res = interpreted["model"]
    assert res.pop("same_params") == 1.0
    assert len(res) > 3
    for key, v in res.items():
        assert v <= FP32_TOL * 10, (key, v)  # through 2 blocks and the head: a few fp32 roundings more


def test_kernels_trace_under_torch_compile(interpreted):
    """fullgraph=True fails on a graph break: each kernel is one op of the graph, forward and backward."""
    for key, v in interpreted["compiled"].items():
        assert v <= FP32_TOL, (key, v)


def test_compiled_blocks_with_kernels(interpreted):
    """``compile_blocks(fullgraph=True)`` over the swapped modules: one graph per block."""
    for key, v in interpreted["compiled blocks"].items():
        assert v <= FP32_TOL * 10, (key, v)
