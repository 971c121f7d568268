"""The fused kernels on CUDA against their references, at Llama-2-7B shapes, in fp32 and bf16
(values and gradients); the same under ``torch.compile`` (the custom ops must not break the
graph); a whole model with the kernels swapped in; and the fused linear cross-entropy's
gradients and peak memory against full_logits_loss at the 7B head size."""

from __future__ import annotations

import functools

import pytest
import torch

from solotune.config import ModelConfig
from solotune.data import IGNORE_INDEX
from solotune.data.batch import Batch
from solotune.model import build_model
from solotune.train.loss import full_logits_loss, get_loss

from kernel_cases import rmsnorm_case, rope_case, swiglu_case

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

f32, bf16 = torch.float32, torch.bfloat16
FP32_TOL = 1e-5  # relative to the largest reference value: summation order, exp's last bit
# Autograd of the reference rounds each op's gradient to its input's dtype, the kernels once at the
# end (and the forward's fp32 reductions run in another order): up to ~3 roundings that differ,
# each at most one bf16 ulp (2^-7 relative at worst).
BF16_TOL = 4 * 2.0**-7


def _check(res: dict[str, float], tol: float) -> None:
    for key, v in res.items():
        if key.endswith("dtype_ok"):
            assert v == 1.0, key
        else:
            assert v <= tol, (key, v)


@pytest.mark.parametrize("x_dtype,w_dtype", [(f32, f32), (bf16, f32), (bf16, bf16)])
def test_rmsnorm_7b(x_dtype, w_dtype):
    _check(rmsnorm_case(8 * 512, 4096, x_dtype, w_dtype, "cuda"), FP32_TOL if x_dtype == f32 else BF16_TOL)


@pytest.mark.parametrize("dtype", [f32, bf16])
def test_swiglu_7b(dtype):
    _check(swiglu_case(8 * 512, 11008, dtype, "cuda"), FP32_TOL if dtype == f32 else BF16_TOL)


@pytest.mark.parametrize("x_dtype,angle_dtype", [(f32, f32), (bf16, f32), (bf16, bf16)])
@pytest.mark.parametrize("heads", [32, 8])  # query heads, and GQA's key heads
def test_rope_7b(x_dtype, angle_dtype, heads):
    res = rope_case(8, 512, heads, 128, x_dtype, angle_dtype, "cuda")
    _check(res, FP32_TOL if angle_dtype == f32 else BF16_TOL)
    if angle_dtype == f32:
        assert res["y"] == 0.0  # fp32 output: the reference's roundings exactly (fp-fusion off)


def test_kernels_under_torch_compile():
    """fullgraph=True fails on any graph break: the custom ops are single nodes of the graph."""
    from solotune.kernels.rmsnorm import rms_norm
    from solotune.kernels.rope import rope
    from solotune.kernels.swiglu import swiglu
    from solotune.model import rope_cos_sin

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 64, 4, 32, generator=g, device="cuda", dtype=bf16, requires_grad=True)
    w = torch.ones(128, device="cuda", dtype=bf16, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(64, device="cuda").expand(2, 64), 32, 10000.0, bf16)

    def f(x, w):
        r = rope(x, cos, sin).flatten(-2)
        n = rms_norm(r, w, 1e-5)
        return swiglu(n, r).float().square().sum()

    eager = f(x, w)
    ge = torch.autograd.grad(eager, (x, w))
    compiled = torch.compile(f, fullgraph=True)(x, w)
    gc = torch.autograd.grad(compiled, (x, w))
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=0)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("precision", [f32, bf16])
def test_model_with_kernels_on_cuda(precision):
    from solotune.kernels import use_fused_kernels

    cfg = ModelConfig(name="k", dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, hidden_dim=688,
                      max_seq_len=256)
    ref = build_model(cfg, seed=0, dtype=precision, device="cuda").requires_grad_(True)
    fused = build_model(cfg, seed=0, dtype=precision, device="cuda").requires_grad_(True)
    use_fused_kernels(fused)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (4, 128), generator=g)
    batch = Batch(input_ids=ids, labels=ids.clone(), positions=torch.arange(128).expand(4, 128).contiguous(),
                  seq_lens=((128,),) * 4).to("cuda")
    out = []
    for m in (ref, fused):
        loss = m(batch, head=functools.partial(full_logits_loss, labels=batch.labels))
        loss.backward()
        out.append((loss.detach(), {n: p.grad.float() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = out
    tol = 1e-5 if precision == f32 else 2e-2
    torch.testing.assert_close(l1, l0, rtol=tol, atol=0)
    for n in g0:
        rel = float((g1[n] - g0[n]).norm() / g0[n].norm().clamp_min(1e-30))
        assert rel <= (1e-4 if precision == f32 else 4e-2), (n, rel)


@pytest.mark.parametrize("loss_name", ["fused-linear-ce", "chunked", "full-logits compiled"])
def test_linear_ce_7b_head(loss_name):
    """8 x 512 tokens through the 7B head (frozen, bf16), as LoRA trains it: loss and d hidden within
    bf16 rounding of full_logits_loss, and the peak of forward + backward at least the fp32
    [tokens x vocab] logits lower — for the chunked and fused losses, and for the full-logits loss
    compiled by Inductor (what compiled runs use: ``get_loss(compiled=True)``)."""
    torch._dynamo.reset()
    name, _, how = loss_name.partition(" ")
    loss_fn = get_loss(name, compiled=how == "compiled")
    N, C, V = 8 * 512, 4096, 32000
    g = torch.Generator(device="cuda").manual_seed(0)
    head = torch.nn.Linear(C, V, bias=False, device="cuda", dtype=bf16).requires_grad_(False)
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=g)
    hidden0 = torch.randn(8, 512, C, generator=g, device="cuda", dtype=bf16)
    labels = torch.randint(0, V, (8, 512), generator=g, device="cuda")
    labels[:, :100] = IGNORE_INDEX

    def run(fn):
        h = hidden0.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn(h, head, labels)
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), h.grad, torch.cuda.max_memory_allocated() - base

    run(loss_fn)  # a compiled loss compiles its forward and backward here
    ref_loss, ref_grad, ref_peak = run(full_logits_loss)
    loss, grad, peak = run(loss_fn)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0)
    assert float((grad.float() - ref_grad.float()).norm() / ref_grad.float().norm()) <= 4 * 2.0**-8
    assert ref_peak - peak >= N * V * 4, (ref_peak, peak)
