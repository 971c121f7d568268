"""GPU checks of the quantized bases: the Triton kernel == the PyTorch path bit for bit on CUDA,
and our NF4 bytes / dequantized values against bitsandbytes' ``quantize_4bit(..., "nf4",
compress_statistics=True, blocksize=64)`` for the same input (skipped without bitsandbytes).

Why the code comparison allows near-ties: bitsandbytes is built with ``--use_fast_math``, so its
``1.0f / absmax`` is the approximate reciprocal (within an ulp or two). A value whose scaled
``w / absmax`` lies within a few ulps of a decision threshold can then fall on the other side;
such a value may get the adjacent code, and nothing else may differ. Dequantization from the
same bytes involves no division and must agree exactly.
"""

from __future__ import annotations

import pytest
import torch

from solotune.quant import NF4Linear
from solotune.quant.dequant import dequantize_nf4
from solotune.quant.nf4 import (BLOCKSIZE, DYNAMIC_MAP, NF4_LEVELS, SCALE_BLOCKSIZE, NF4Weight, blockwise_absmax,
                                dequantize_nf4_torch, quantize_nf4)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [(4096, 4096), (1024, 11008), (333, 777), (7, 13)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _weight(shape, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(shape, generator=g, device="cuda") * 0.02
    w.view(-1)[:: 997] *= 8  # a few outliers, so block absmax values spread
    return w.to(dtype)


def _unpack(codes: torch.Tensor) -> torch.Tensor:
    c = codes.reshape(-1).long()
    return torch.stack([c >> 4, c & 15], dim=1).reshape(-1)


# ------------------------------------------------------------------------- Triton vs PyTorch
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_equals_pytorch_on_cuda(shape, dtype):
    pytest.importorskip("triton")
    from solotune.quant.triton_nf4 import dequantize_nf4_triton

    q = quantize_nf4(_weight(shape, torch.bfloat16))
    for out_dtype in DTYPES:
        ref = dequantize_nf4_torch(q, out_dtype)
        got = dequantize_nf4_triton(q, out_dtype)
        assert got.dtype == out_dtype and got.shape == shape
        assert torch.equal(got, ref), (got.float() - ref.float()).abs().max()
    assert torch.equal(dequantize_nf4(q, dtype), dequantize_nf4_torch(q, dtype))  # auto picks Triton, same bits


def test_nf4_linear_trains_on_cuda_under_autocast():
    """Forward and input gradient through NF4Linear on CUDA (Triton dequantization) equal
    F.linear over the dequantized weight (PyTorch path)."""
    w = _weight((512, 1024), torch.bfloat16)
    m = NF4Linear.from_weight(w, torch.bfloat16)
    assert m.device.type == "cuda"
    x = torch.randn(4, 64, 1024, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    W = dequantize_nf4_torch(m.nf4, torch.bfloat16)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2.bfloat16(), W)
    assert torch.equal(y, y2)
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-2, atol=1e-3)


# ------------------------------------------------------------------------ vs bitsandbytes
def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _near_ties_only(ours: torch.Tensor, theirs: torch.Tensor, x: torch.Tensor, levels: torch.Tensor) -> None:
    """Codes may differ only by one step, and only where x sits within 8 ulps of the threshold
    between the two levels."""
    bad = ours != theirs
    if not bool(bad.any()):
        return
    lo = torch.minimum(ours[bad], theirs[bad])
    assert bool(((ours[bad] - theirs[bad]).abs() == 1).all()), "codes differ by more than one level"
    mids = (levels[1:] + levels[:-1]) * 0.5
    dist = (x[bad] - mids[lo]).abs()
    tol = 8 * torch.finfo(torch.float32).eps * mids[lo].abs().clamp_min(1e-30)
    assert bool((dist <= tol).all()), f"{int(bad.sum())} codes differ, worst {float((dist / tol).max()):.1f}x tolerance"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_bytes_and_scales_match_bitsandbytes(shape, dtype):
    F = _bnb()
    w = _weight(shape, dtype, seed=1)
    packed, state = F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    q = quantize_nf4(w)
    dev = w.device
    # The format's constants.
    assert torch.equal(state.state2.code.float().to(dev), DYNAMIC_MAP.to(dev))
    if hasattr(F, "get_4bit_type"):
        assert torch.equal(F.get_4bit_type("nf4", device=dev).float(), NF4_LEVELS.to(dev))
    assert state.blocksize == BLOCKSIZE and state.state2.blocksize == SCALE_BLOCKSIZE
    # First-level absmax: exact (a max), hence the offset (the same torch mean) and second level.
    offset = torch.as_tensor(state.offset, device=dev).float().reshape(1)
    assert torch.equal(offset, q.offset)
    assert torch.equal(state.state2.absmax.float(), q.absmax2)
    # Codes: same layout (high nibble first), equal but for near-ties of the fast-math reciprocal.
    assert packed.dtype == torch.uint8 and packed.numel() == q.codes.numel()
    absmax = blockwise_absmax(w)
    n = w.numel()
    pad = -n % BLOCKSIZE
    flat = torch.cat([w.reshape(-1).float(), w.new_zeros(pad).float()]).view(-1, BLOCKSIZE)
    x = (flat / absmax[:, None]).reshape(-1)[:n]
    _near_ties_only(_unpack(q.codes)[:n], _unpack(packed)[:n], x, NF4_LEVELS.to(dev))
    centred = absmax - q.offset
    x2 = centred / q.absmax2[torch.arange(absmax.numel(), device=dev) // SCALE_BLOCKSIZE]
    _near_ties_only(q.qabsmax.long(), state.absmax.long(), x2, DYNAMIC_MAP.to(dev))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_bitsandbytes_exactly(shape, dtype):
    """bitsandbytes' bytes and scales, dequantized by our PyTorch path and by our Triton kernel,
    give exactly what ``dequantize_4bit`` gives."""
    F = _bnb()
    w = _weight(shape, dtype, seed=2)
    packed, state = F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    theirs = F.dequantize_4bit(packed, state)
    assert theirs.dtype == dtype and tuple(theirs.shape) == shape
    q = NF4Weight(packed.reshape(-1), state.absmax, state.state2.absmax.float(),
                  torch.as_tensor(state.offset, device=w.device).float().reshape(1), torch.Size(shape))
    assert torch.equal(dequantize_nf4_torch(q, dtype), theirs)
    assert torch.equal(dequantize_nf4(q, dtype), theirs)  # Triton when installed
    # And our own quantization dequantizes to theirs except at the near-tie codes.
    ours = dequantize_nf4(quantize_nf4(w), dtype)
    same = (ours == theirs).float().mean().item()
    assert same > 1 - 1e-3, same


# ------------------------------------------------------------------------------- the fp8 base
@pytest.mark.parametrize("shape", [(512, 1024, 768), (4096, 4096, 11008), (8, 11008, 4096)])
def test_fp8_scaled_mm_equals_the_reference_path(shape):
    """On CUDA the fp8 base multiplies through torch._scaled_mm; its forward and input gradient equal
    the fp32 product of the same quantized values up to accumulation order and the bf16 output rounding."""
    from solotune.quant.fp8 import fp8_linear, quantize_fp8, quantize_rows, scaled_mm_available

    m, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, generator=g, device="cuda").bfloat16().requires_grad_(True)
    w = torch.randn(n, k, generator=g, device="cuda") * 0.02
    q, s = quantize_fp8(w)
    assert scaled_mm_available(x, q, torch.bfloat16)
    y = fp8_linear(x, q, q.t().contiguous(), s)
    dy = torch.randn(y.shape, generator=g, device="cuda").bfloat16()
    y.backward(dy)
    # the fp64 product of the very codes the GPU made (the CPU's row quantization may round a few
    # elements differently: benchmarks/results/frontier5-h200/run2/fp8_probe.log)
    xq, a = quantize_rows(x.detach())
    y_ref = (xq.double() * a.double()) @ (q.double() * s.double()[:, None]).t()
    gq, b = quantize_rows(dy * s)
    dx_ref = (gq.double() * b.double()) @ q.double()
    y_abs = (xq.double().abs() * a.double()) @ (q.double().abs() * s.double()[:, None]).t()
    dx_abs = (gq.double().abs() * b.double()) @ q.double().abs()
    for got, ref, scale in ((y, y_ref, y_abs), (x.grad, dx_ref, dx_abs)):
        # the bf16 output rounding (up to 2^-8 relative) + the fp8 tensor cores' accumulation, whose error
        # scales with sum_j |x_j w_j| (not with |y|: random data cancels); a wrong scale would be off by O(|y|)
        err = (got.double() - ref).abs()
        assert (err <= 2 ** -7 * ref.abs() + 2 ** -10 * scale).all(), err.max()
        assert err.max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("reference,quantize,checkpointing", [("none", "fp8", "off"), ("nf4", "nf4-fp8", "off"),
                                                             ("nf4", "nf4-fp8", "all")])
def test_fp8_lora_blocks_compile_with_inductor(reference, quantize, checkpointing):
    """A bf16 LoRA model over fp8 bases (fp8; nf4-fp8: NF4 storage converted per call) with Inductor-compiled
    blocks (which lower _scaled_mm and fuse the per-row quantization; checkpointed: recompute the fp8 GEMMs
    and conversions) is as close to the 16-bit-computed model (over the 16-bit / NF4 base) as the eager fp8
    blocks are. Not bit for bit: the fused quantization rounds some elements differently (measured: adapter
    gradients 5.4% apart, each ~7.7% from bf16's; benchmarks/results/frontier5-h200/run4/fp8_compiled.log)."""
    import functools

    from solotune.config import ModelConfig
    from solotune.model import build_model
    from solotune.peft import apply_lora
    from solotune.quant import swap_in_quantized
    from solotune.train.loss import full_logits_loss

    cfg = ModelConfig(name="fp8", dim=256, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=512, hidden_dim=512,
                      max_seq_len=256)
    tokens = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(2)).cuda()

    def run(quantize: str, compiled: bool):
        model = build_model(cfg, seed=0, dtype=torch.bfloat16)
        if quantize != "none":
            swap_in_quantized(model, quantize, compute_dtype=torch.bfloat16)
        apply_lora(model, ("wq", "wv"), rank=8, alpha=16, dropout=0.0, generator=torch.Generator().manual_seed(0))
        for n, p in model.named_parameters():
            if "lora_b" in n:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        model.to("cuda").train()
        model.set_grad_checkpointing(checkpointing)
        torch._dynamo.reset()
        if compiled:
            model.compile_blocks(fullgraph=True)
        loss = model(tokens, head=functools.partial(full_logits_loss, labels=tokens))
        loss.backward()
        torch._dynamo.reset()
        return float(loss), torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])

    ref_loss, ref = run(reference, False)
    eager_loss, eager = run(quantize, False)
    loss, got = run(quantize, True)
    assert loss == pytest.approx(ref_loss, rel=1e-3) and eager_loss == pytest.approx(ref_loss, rel=1e-3)
    eager_err, compiled_err = (eager - ref).norm() / ref.norm(), (got - ref).norm() / ref.norm()
    assert compiled_err <= 1.25 * eager_err, (compiled_err, eager_err)
    assert eager_err < 0.2  # and the fp8 error itself stays bounded


def test_nf4_fp8_on_cuda_matches_the_fp8_base_of_its_codes():
    """nf4-fp8 on CUDA (the Triton NF4 -> e4m3 conversion, then _scaled_mm) == an Fp8Linear holding the
    same codes and row scales (same GEMM), forward and input gradient."""
    from solotune.quant import Fp8Linear, NF4Fp8Linear
    from solotune.quant.nf4_fp8 import nf4_to_fp8

    w = _weight((1024, 512), torch.bfloat16)
    m = NF4Fp8Linear.from_weight(w, torch.bfloat16)
    inv = m.fp8_inv_scale_bits.view(torch.float32)
    twin = Fp8Linear(512, 1024, torch.bfloat16, device="meta")
    twin._set(qweight_bits=nf4_to_fp8(m.nf4, inv).view(torch.uint8), scale_bits=m.fp8_scale_bits,
              qweight_t_bits=nf4_to_fp8(m.nf4, inv, transpose=True).view(torch.uint8))
    outs = []
    for mod in (m, twin):
        x = torch.randn(256, 512, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        x = x.bfloat16().requires_grad_(True)
        y = mod(x)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), x.grad))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_nf4_to_fp8_equals_pytorch_on_cuda(shape):
    """The fused NF4 -> e4m3 kernel == dequantize (fp32) * (1 / row scale) -> e4m3 in PyTorch, bit for bit, both
    layouts (the GPU's fp8 rounding; the values before it are checked on CPU under the interpreter)."""
    from solotune.quant.nf4_fp8 import nf4_row_scales, nf4_to_fp8_torch
    from solotune.quant.triton_nf4 import nf4_to_fp8_triton

    if shape[1] % 2:
        pytest.skip("the kernel takes an even in_features (the PyTorch path serves odd ones)")
    q = quantize_nf4(_weight(shape, torch.bfloat16))
    _, inv = nf4_row_scales(q)
    for transpose in (False, True):
        got = nf4_to_fp8_triton(q, inv, transpose)
        assert got.dtype == torch.float8_e4m3fn
        assert torch.equal(got.view(torch.uint8), nf4_to_fp8_torch(q, inv, transpose).view(torch.uint8))
