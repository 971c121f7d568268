"""Blockwise dynamic quantization: the maps, the round-trip bound, exact zeros, partial blocks."""

from __future__ import annotations

import pytest
import torch

from solotune.optim import blockwise


@pytest.mark.parametrize("signed", [True, False])
def test_maps_are_sorted_and_span_the_range(signed):
    m = blockwise.dynamic_map(signed)
    assert m.shape == (256,) and m.dtype == torch.float32
    assert torch.all(m[1:] >= m[:-1])
    assert m.max() == 1.0 and (m.min() == -1.0 if signed else m.min() == 0.0)
    assert (m == 0).sum() == 1
    assert m[m > 0].min() < 1e-5  # the dynamic part: codes down to ~1e-6 of the block's maximum


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 3000])
def test_round_trip_error_is_at_most_half_the_local_gap(signed, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-6, 2, n)[torch.randperm(n, generator=g)]
    if not signed:
        x = x.abs()
    qmap = blockwise.dynamic_map(signed)
    codes, absmax = blockwise.quantize(x, qmap)
    assert codes.dtype == torch.uint8 and codes.shape == (n,) and absmax.shape == (blockwise.n_blocks(n),)
    y = blockwise.dequantize(codes, absmax, qmap)
    # Per element: x / A lies between two neighbouring map entries; the error is at most half
    # that gap times the block's absmax A (plus fp32 rounding of the product).
    a = absmax.repeat_interleave(blockwise.BLOCK)[:n].double()
    u = (x.double() / a).clamp(-1, 1)
    m = qmap.double()
    hi = torch.searchsorted(m, u).clamp(1, 255)
    gap = m[hi] - m[hi - 1]
    bound = a * gap / 2 + 1e-6 * a
    assert torch.all((y.double() - x.double()).abs() <= bound)
    # the largest element of every block is exact (it maps to +-1)
    blocks = x.reshape(-1)[: (n // blockwise.BLOCK) * blockwise.BLOCK].view(-1, blockwise.BLOCK)
    if blocks.numel():
        idx = blocks.abs().argmax(dim=1) + torch.arange(blocks.shape[0]) * blockwise.BLOCK
        assert torch.equal(y[idx], x[idx])


def test_zeros_stay_exact_and_small_values_keep_relative_precision():
    qmap = blockwise.dynamic_map(False)
    x = torch.zeros(512)
    x[0], x[1], x[300] = 1.0, 1e-4, 3e-3  # second block: its own scale
    y = blockwise.dequantize(*blockwise.quantize(x, qmap), qmap)
    assert torch.equal(y[2:300], torch.zeros(298)) and y[301:].eq(0).all()
    assert abs(y[1] / x[1] - 1) < 0.2  # a linear int8 map would give 0 here
    assert y[300] == x[300]


def test_quantized_bytes():
    assert blockwise.quantized_bytes(256) == 256 + 4
    assert blockwise.quantized_bytes(257) == 257 + 8
