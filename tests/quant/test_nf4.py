"""The NF4 format (solotune/quant/nf4.py): the 16 levels from normal quantiles, the packed byte
layout, the round-trip error bound, double quantization of the scales and its bound, the
storage formula."""

from __future__ import annotations

import math

import pytest
import torch

from solotune.quant.dequant import dequantize_nf4
from solotune.quant.nf4 import (BLOCKSIZE, DYNAMIC_MAP, NF4_LEVELS, NF4_OFFSET, NF4_ZERO_CODE, SCALE_BLOCKSIZE,
                                blockwise_absmax, dequantize_scales, nf4_levels_from_quantiles,
                                nf4_storage_shapes, nf4_weight_bytes, quantize_nf4, quantize_scales)


def _unpack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [m] -> int64 [2m], high nibble first (written independently of the library)."""
    return torch.stack([codes.long() // 16, codes.long() % 16], dim=1).reshape(-1)


# ------------------------------------------------------------------------------------ levels
def test_levels_are_the_normal_quantile_construction():
    """The table is what the QLoRA construction gives, bit for bit, and (to an fp32 ulp or so)
    what the paper's exact offset 1/2 (1 - 1/30 + 1 - 1/32) gives."""
    assert torch.equal(nf4_levels_from_quantiles(), NF4_LEVELS)
    exact = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    assert abs(exact - NF4_OFFSET) < 1e-7
    assert torch.allclose(nf4_levels_from_quantiles(exact), NF4_LEVELS, rtol=0, atol=1e-6)
    # Independently: positive levels are Phi^-1 of evenly spaced probabilities, divided by the largest.
    p = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1]
    pos = torch.special.ndtri(p)
    assert torch.allclose(NF4_LEVELS[8:].double().flip(0), pos / pos[0], rtol=0, atol=1e-6)


def test_levels_structure():
    """16 ascending values, exactly -1, 0 and 1, 7 negative and 8 positive (asymmetric: the
    extra positive level buys an exact zero), the negative half the mirror of a 7-point
    quantile grid."""
    L = NF4_LEVELS
    assert L.shape == (16,) and L.dtype == torch.float32
    assert bool((L[1:] > L[:-1]).all())
    assert L[0].item() == -1.0 and L[-1].item() == 1.0 and L[NF4_ZERO_CODE].item() == 0.0
    assert int((L < 0).sum()) == 7 and int((L > 0).sum()) == 8
    p = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1]
    neg = -torch.special.ndtri(p)
    assert torch.allclose(L[:7].double(), neg / -neg[0], rtol=0, atol=1e-6)
    # Denser near 0 than at the tails (the normal density).
    gaps = (L[1:] - L[:-1])
    assert gaps[7] < gaps[-1] and gaps[6] < gaps[0]


def test_dynamic_map_structure():
    """256 distinct ascending values in [-1, 1] with 0 and 1, 127 negative / 128 positive; in each
    decade 10^e (e = -6..0) 2^(e+6) values per sign."""
    D = DYNAMIC_MAP
    assert D.shape == (256,) and bool((D[1:] > D[:-1]).all())
    assert D[-1].item() == 1.0 and 0.0 in D.tolist() and D[0].item() > -1.0
    assert int((D < 0).sum()) == 127 and int((D > 0).sum()) == 128
    mags = D[D > 0].double()
    for e in range(-6, 1):
        inside = ((mags >= 0.1 * 10**e) & (mags < 10**e)).sum().item()
        assert inside == 2 ** (e + 6), e


# ---------------------------------------------------------------------------------- layout
def test_packed_layout_is_high_nibble_first_row_major():
    """A weight whose values are the 16 levels in a known order, absmax 1 per block: byte i holds
    value 2i in its high nibble and value 2i+1 in its low nibble, values read row-major."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (4, 64), generator=g)
    idx[:, 0] = 15  # every block's absmax is exactly 1 (level 15 = 1.0): no scaling
    w = NF4_LEVELS[idx]
    q = quantize_nf4(w)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (128,)
    flat = idx.reshape(-1)
    assert torch.equal(q.codes.long(), flat[0::2] * 16 + flat[1::2])
    assert torch.equal(dequantize_nf4(q, torch.float32), w)  # absmax 1 survives double quantization exactly


def test_codes_are_the_nearest_level():
    """Every code is the level nearest to w / absmax (ties excepted: a tie is a measure-zero set
    and either neighbour is nearest)."""
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    q = quantize_nf4(w)
    x = (w.reshape(-1, BLOCKSIZE) / blockwise_absmax(w)[:, None]).reshape(-1)
    dist = (x[:, None] - NF4_LEVELS[None, :]).abs()
    got = _unpack(q.codes)
    assert torch.allclose(dist.gather(1, got[:, None]).squeeze(1), dist.min(dim=1).values, rtol=0, atol=1e-7)
    assert (got == dist.argmin(dim=1)).float().mean() == 1.0


# ------------------------------------------------------------------------------- error bound
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_bound(dtype):
    """|w - deq(q(w))| <= (g/2) * a + |a - a'| per element, where g is the largest gap between
    adjacent levels, a the block's true absmax and a' its double-quantized value (|level| <= 1);
    plus the output rounding of ``dtype`` (half an ulp of the result) and fp32 products."""
    torch.manual_seed(2)
    w = (torch.randn(128, 320) * 0.05).to(dtype)
    q = quantize_nf4(w)
    wf = w.float().reshape(-1, BLOCKSIZE)
    a = blockwise_absmax(w)[:, None]
    a_dq = dequantize_scales(q.qabsmax, q.absmax2, q.offset)[:, None]
    g = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()
    deq32 = dequantize_nf4(q, torch.float32).reshape(-1, BLOCKSIZE)
    bound = g / 2 * a + (a - a_dq).abs() + 1e-6 * a
    err32 = (wf - deq32).abs()
    assert bool((err32 <= bound).all()), (err32 - bound).max()
    deq = dequantize_nf4(q, dtype).float().reshape(-1, BLOCKSIZE)
    ulp_half = deq32.abs() * torch.finfo(dtype).eps / 2
    assert bool(((wf - deq).abs() <= bound + ulp_half).all())
    # The bound is not vacuous: the worst element uses a good part of it.
    assert (err32 / bound).max() > 0.5


def test_double_quantization_error_bound():
    """Each absmax comes back within half the dynamic map's gap around it, times the group's
    second-level scale: |a - a'| <= (gap/2) * absmax2 (+ fp32 rounding), and its code is the
    nearest one."""
    torch.manual_seed(3)
    absmax = torch.rand(1000) * 0.3 + 0.01  # 1000 blocks -> 4 groups of 256 (the last partial)
    qa, a2, off = quantize_scales(absmax)
    assert qa.dtype == torch.uint8 and qa.shape == (1000,) and a2.shape == (math.ceil(1000 / 256),)
    assert torch.allclose(off, absmax.mean().reshape(1))
    back = dequantize_scales(qa, a2, off)
    group = torch.arange(1000) // SCALE_BLOCKSIZE
    x = (absmax - off) / a2[group]
    dist = (x[:, None] - DYNAMIC_MAP[None, :]).abs()
    assert torch.allclose(dist.gather(1, qa.long()[:, None]).squeeze(1), dist.min(dim=1).values, atol=1e-7)
    gap = (DYNAMIC_MAP[1:] - DYNAMIC_MAP[:-1]).max()
    assert bool(((absmax - back).abs() <= gap / 2 * a2[group] + 1e-6 * absmax).all())
    for s in range(0, 1000, SCALE_BLOCKSIZE):  # each group's absmax2 is the absmax of its centred values
        assert a2[s // SCALE_BLOCKSIZE] == (absmax[s:s + SCALE_BLOCKSIZE] - off).abs().max()


def test_zero_blocks_and_constant_scales_are_exact():
    """A block of zeros dequantizes to zeros; when every absmax is equal, the centred absmax are 0
    and the scales come back exactly (the offset)."""
    w = torch.zeros(4, 128)
    w[0, :64] = torch.linspace(-1, 1, 64)
    q = quantize_nf4(w)
    deq = dequantize_nf4(q, torch.float32)
    assert torch.equal(deq[1:], torch.zeros(3, 128)) and torch.equal(deq[0, 64:], torch.zeros(64))
    assert bool((_unpack(q.codes)[64:] == NF4_ZERO_CODE).all())
    same = NF4_LEVELS[torch.arange(256) % 16].reshape(4, 64)  # every block's absmax = 1
    q = quantize_nf4(same)
    assert torch.equal(dequantize_scales(q.qabsmax, q.absmax2, q.offset), torch.ones(4))


def test_any_numel_and_shape():
    """Odd sizes: a partial last block and a half-filled last byte round-trip within the bound."""
    torch.manual_seed(4)
    w = torch.randn(7, 13)  # 91 values: 2 blocks, 46 bytes
    q = quantize_nf4(w)
    assert q.codes.shape == (46,) and q.qabsmax.shape == (2,)
    deq = dequantize_nf4(q, torch.float32)
    assert deq.shape == (7, 13)
    a = blockwise_absmax(w)
    a_dq = dequantize_scales(q.qabsmax, q.absmax2, q.offset)
    g = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()
    per = torch.repeat_interleave(g / 2 * a + (a - a_dq).abs() + 1e-6, BLOCKSIZE)[:91]
    assert bool(((w.reshape(-1) - deq.reshape(-1)).abs() <= per).all())


# ---------------------------------------------------------------------------------- storage
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (576, 1536), (7, 13)])
def test_storage_formula(shape):
    """Bytes = ceil(n/2) codes + nb 8-bit absmax + 4 * ceil(nb/256) fp32 scales + a 4-byte offset,
    nb = ceil(n/64); per weight that tends to 1/2 + 1/64 + 4/(64*256) bytes, and the scales cost
    8 + 32/256 bits per block instead of the 32 of fp32 absmax."""
    n = shape[0] * shape[1]
    nb = -(-n // 64)
    expected = -(-n // 2) + nb + 4 * (-(-nb // 256)) + 4
    assert nf4_weight_bytes(n) == expected
    assert nf4_storage_shapes(n) == {"codes": -(-n // 2), "qabsmax": nb, "absmax2": -(-nb // 256), "offset": 1}
    if n % (64 * 256) == 0:
        # n * (1/2 + 1/64 + 4/(64*256)) bytes, exactly, plus the offset
        assert expected == n // 2 + n // 64 + 4 * n // (64 * 256) + 4
        dq_scale_bits = (expected - n / 2 - 4) * 8 / nb
        assert dq_scale_bits == 8 + 32 / 256 and dq_scale_bits < 32


def test_storage_formula_matches_the_tensors():
    torch.manual_seed(5)
    w = torch.randn(96, 200)
    q = quantize_nf4(w)
    assert q.nbytes == nf4_weight_bytes(w.numel())
    assert q.codes.dtype == q.qabsmax.dtype == torch.uint8
    assert q.absmax2.dtype == q.offset.dtype == torch.float32
