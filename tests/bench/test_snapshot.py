"""The allocator-trace replay (solotune/bench/snapshot.py) on synthetic traces; on CUDA, against
torch.cuda.max_memory_allocated of the recorded step."""

from __future__ import annotations

import pytest
import torch

from solotune.bench.snapshot import format_peak, peak_of_trace, record_peak, where


def _alloc(addr, size, file="solotune/x.py", line=1):
    return {"action": "alloc", "addr": addr, "size": size,
            "frames": [{"filename": "torch/a.py", "line": 9, "name": "f"}, {"filename": file, "line": line, "name": "g"}]}


def _free(addr, size):
    return {"action": "free_requested", "addr": addr, "size": size, "frames": []}


def test_the_peak_and_what_was_alive_then():
    trace = [_alloc(1, 100, line=1), _alloc(2, 50, line=2), _free(1, 100), _alloc(3, 80, line=3),
             _alloc(4, 30, line=3), {"action": "free_completed", "addr": 1, "size": 100}, _free(3, 80), _free(2, 50)]
    s = peak_of_trace(trace, baseline=1000)
    assert s.peak == 1000 + 50 + 80 + 30 and s.baseline == 1000
    assert s.alive == (("solotune/x.py:3 g", 2, 110), ("solotune/x.py:2 g", 1, 50))  # grouped by site, most first


def test_frees_of_blocks_made_before_recording_lower_the_baseline():
    s = peak_of_trace([_free(7, 400), _alloc(1, 300), _free(1, 300)], baseline=1000)
    assert s.peak == 1000 and s.alive == ()  # the alloc after the free never exceeds the start
    s = peak_of_trace([_free(7, 400), _alloc(1, 500)], baseline=1000)
    assert s.peak == 1100 and s.baseline == 600 and s.alive[0][2] == 500


def test_where_prefers_the_project_then_python_frames():
    assert where([{"filename": "c10/a.cpp", "line": 1}, {"filename": "/x/solotune/m.py", "line": 5, "name": "h"}]) \
        == "/x/solotune/m.py:5 h"
    assert where([{"filename": "c10/a.cpp", "line": 1, "name": "k"}, {"filename": "t.py", "line": 2}]) == "t.py:2"
    assert where([]) == "?"
    text = format_peak(peak_of_trace([_alloc(i, 2**20, line=i) for i in range(30)]), top=5)
    assert "peak allocated 30.0 MiB" in text and "(25 more sites)" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_replay_equals_the_allocators_peak():
    keep = torch.empty(3 << 20, dtype=torch.uint8, device="cuda")

    def step():
        a = torch.empty(5 << 20, dtype=torch.uint8, device="cuda")
        b = torch.empty(7 << 20, dtype=torch.uint8, device="cuda")
        del a
        c = torch.empty(2 << 20, dtype=torch.uint8, device="cuda")
        del b, c

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    s = record_peak(step)
    assert s.peak == torch.cuda.max_memory_allocated()
    assert sum(b for *_, b in s.alive) == (5 << 20) + (7 << 20) and "test_snapshot.py" in s.alive[0][0]
    del keep
