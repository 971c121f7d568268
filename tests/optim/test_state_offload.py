"""The optimizer-state store's host memory (solotune/optim/offload.py, HostArena): views packed into
power-of-two slabs instead of one pinned tensor per state (which torch's caching host allocator rounds
up to a power of two). Equality of offloaded training is tests/optim/test_in_backward.py's; pinned
slabs on CUDA are tests/optim/test_optim_gpu.py's."""

from __future__ import annotations

import io

import pytest
import torch

from solotune.optim.offload import HostArena

SHAPES = [((3, 5), torch.float32), ((), torch.float32), ((100,), torch.uint8), ((2000,), torch.float32),
          ((7,), torch.bool), ((1000,), torch.bfloat16), ((0,), torch.float32), ((33, 3), torch.float64)]


def test_views_have_the_shape_and_dtype_asked_and_do_not_overlap():
    arena = HostArena(pin=False, slab_bytes=4096)
    views = [arena.empty_like(torch.empty(s, dtype=d)) for s, d in SHAPES]
    assert [(tuple(v.shape), v.dtype) for v in views] == [(s, d) for s, d in SHAPES]
    assert all(v.is_contiguous() and v.device.type == "cpu" for v in views)
    for i, v in enumerate(views):  # fill each with its own bytes, then check none was overwritten
        v.view(-1).view(torch.uint8).fill_(i + 1)
    for i, v in enumerate(views):
        assert bool((v.view(-1).view(torch.uint8) == i + 1).all()), i


def test_slabs_are_powers_of_two_and_hold_little_more_than_the_states():
    arena = HostArena(pin=False, slab_bytes=1 << 20)
    sizes = [45_088_768 // 64, 16_777_216 // 64] * 40  # a 7B's w1 / wq 8-bit moments, scaled down 64x
    for n in sizes:
        arena.empty_like(torch.empty(n, dtype=torch.uint8))
    assert all(s.buf.numel() & (s.buf.numel() - 1) == 0 for s in arena.slabs[torch.uint8])
    # one tensor per state would take sum(pow2ceil(n)) (the caching host allocator): ~1.2x here
    assert arena.reserved_bytes <= 1.1 * sum(sizes) < sum(1 << (n - 1).bit_length() for n in sizes)
    assert len(arena.slabs[torch.uint8]) <= len(sizes) / 2


def test_a_small_store_stays_small():
    arena = HostArena(pin=False)  # the default 256 MiB slab is a cap, not the first slab's size
    for _ in range(64):
        arena.empty_like(torch.empty(1024, dtype=torch.float32))  # LoRA-sized states
    assert arena.reserved_bytes <= 2 * 64 * 4096


def test_saved_states_load_back_weights_only():
    """The trainer state is torch.save'd: views of shared slabs (one dtype per slab: torch.save refuses
    one storage viewed as two dtypes, as 8-bit AdamW's uint8 codes and fp32 scales would be) are
    written once each and load back (weights_only) as equal tensors."""
    arena = HostArena(pin=False, slab_bytes=8192)
    states = {i: arena.empty_like(torch.empty(s, dtype=d)) for i, (s, d) in enumerate(SHAPES) if d != torch.bool}
    for i, v in states.items():
        v.copy_(torch.randn(v.shape, generator=torch.Generator().manual_seed(i)).to(v.dtype))
    buf = io.BytesIO()
    torch.save(states, buf)
    assert buf.tell() < arena.reserved_bytes + 4096  # each slab once, not once per view
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert all(torch.equal(loaded[i], v) for i, v in states.items())


@pytest.mark.parametrize("n", [1, 511, 512, 513])
def test_every_view_starts_on_a_512_byte_boundary(n):
    arena = HostArena(pin=False, slab_bytes=1 << 16)
    views = [arena.empty_like(torch.empty(n, dtype=torch.uint8)) for _ in range(9)]
    assert len(arena.slabs[torch.uint8]) < len(views)  # some slabs hold several
    assert all(v.storage_offset() % 512 == 0 for v in views)
