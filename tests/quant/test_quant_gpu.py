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
