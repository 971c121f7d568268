"""The planner's block backward (dryrun.block_backward: one block's recomputation + backward traced on fake
tensors) against a real CPU run's live tensor bytes: a 2-layer model on one long row, the losses and
checkpointing policies the long-row probes use. With fused linear-CE (no logits-sized gradients) a block's
backward is the peak, which the planner used to miss by 12-15% (benchmarks/NOTES.md, fourth session)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from solotune.bench.dryrun import _LiveBytes
from solotune.config import ModelConfig

_SPEC = importlib.util.spec_from_file_location("planner_peak_cpu",
                                               Path(__file__).parents[2] / "benchmarks" / "planner_peak_cpu.py")
peak_cpu = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(peak_cpu)

CFG = ModelConfig(name="mid", dim=256, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=2048, hidden_dim=704,
                  max_seq_len=1024)


@pytest.mark.parametrize("loss,gc,precision", [("fused-linear-ce", "all", "bf16"), ("fused-linear-ce", "off", "bf16"),
                                               ("full-logits", "all", "bf16"), ("fused-linear-ce", "all", "bf16-amp")])
def test_predicted_peak_of_a_long_row_within_3_percent_of_a_real_run(loss, gc, precision):
    measured, predicted = peak_cpu.measure(CFG, 1024, loss, gc, precision)
    assert abs(predicted - measured) <= 0.03 * measured, (predicted, measured)


def test_live_bytes_follow_autograd():
    """The meter counts a storage once however many views, frees it with its last view, ignores views of
    storages made outside it, and sees saved tensors live until their backward ran."""
    w = torch.randn(64, 64, requires_grad=True)  # made outside: its views are not counted
    meter = _LiveBytes()
    with meter:
        a = torch.randn(32, 64)
        b = a.view(64, 32)
        y = (a @ w.t()).sin()  # sin saves its input (the matmul output)
        del a
        assert meter.live == 3 * 32 * 64 * 4  # a (still viewed by b), the saved matmul output, y
        del b
        assert meter.live == 3 * 32 * 64 * 4  # a is still saved by the matmul (for w's gradient)
        y.sum().backward()  # frees both saved tensors; makes w.grad (a new storage)
        assert meter.live == 32 * 64 * 4 + 64 * 64 * 4
        del y
    w.grad = None
    assert meter.live == 0
