"""attention.py: bucketed segment padding keeps the boundaries (and so the attention) unchanged."""

from __future__ import annotations

import torch

from solotune.attention import Varlen, pad_segments


def test_pad_segments_appends_empty_segments_up_to_a_power_of_two():
    cu = torch.tensor([0, 5, 9, 18], dtype=torch.int32)
    assert pad_segments(cu).tolist() == [0, 5, 9, 18, 18, 18, 18, 18]  # at least 8 entries
    nine = torch.arange(0, 90, 10, dtype=torch.int32)
    got = pad_segments(nine)
    assert got.numel() == 16 and got[:9].tolist() == nine.tolist() and set(got[9:].tolist()) == {80}
    eight = torch.arange(8, dtype=torch.int32)
    assert pad_segments(eight) is eight  # already a bucket size
    lengths = {pad_segments(torch.arange(n, dtype=torch.int32)).numel() for n in range(2, 40)}
    assert lengths == {8, 16, 32, 64}  # 38 document counts, four shapes


def test_padded_segments_attend_exactly_as_the_unpadded_ones():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 5, 12, 15, 24], dtype=torch.int32)  # row 0: 5 + 7; row 1: 3 + 9
    plain = Varlen(cu, 12).attend(q, k, v)  # fp64: the exact dense fallback
    padded = Varlen(pad_segments(cu), 12).attend(q, k, v)
    assert torch.equal(plain, padded)
