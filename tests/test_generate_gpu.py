"""GPU checks of compiled decoding: Inductor + CUDA graphs (the default options, and plain ``mode="reduce-overhead"``) give the
eager tokens (fp32, greedy and seeded sampling, left-padded batch), never skip the CUDA graph, and
replay one graph for every token and for a later call (no recompilation)."""

from __future__ import annotations

import pytest
import torch

from solotune.config import ModelConfig
from solotune.generate import Decoder, generate_tokens
from solotune.model import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CFG = ModelConfig.from_name("tiny").replace(n_layers=4)  # vocab 256, GQA 4/2: wide gaps between top logits
PROMPTS = [[1, 5, 7, 9, 11, 13], [1, 3], [1, 100, 200, 30], [7]]


@pytest.fixture(scope="module")
def model():
    torch._dynamo.reset()
    yield build_model(CFG, seed=0, device="cuda").eval()
    torch._dynamo.reset()


@pytest.mark.parametrize("how", [{}, {"mode": "reduce-overhead"}], ids=["default-options", "reduce-overhead"])
def test_cudagraph_decode_equals_eager(model, how) -> None:
    """Both the default (CUDA graphs + GEMV tuning: batch-1 matmuls become Triton reductions) and
    plain ``reduce-overhead`` (cuBLAS matmuls) decode the eager tokens."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    dec = Decoder(model, compile=True, **how)
    if how:
        assert dec.mode == "reduce-overhead" and dec.options is None
    else:
        assert dec.options == {"triton.cudagraphs": True, "coordinate_descent_tuning": True} and dec.mode is None
    assert dec.check_every > 1
    want = generate_tokens(model, PROMPTS, 24)
    assert generate_tokens(dec, PROMPTS, 24) == want
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1
    other = [[2, 4], [1, 9, 9, 9, 9, 9, 9, 9], [3], [5, 6, 7]]  # same batch and cache bucket
    assert generate_tokens(dec, other, 20) == generate_tokens(model, other, 20)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    if not how:  # seeded sampling: one more compiled step (the default options only: compile time)
        kw = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}
        assert generate_tokens(dec, PROMPTS, 24, seed=3, **kw) == generate_tokens(model, PROMPTS, 24, seed=3, **kw)
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    dec.release()


def test_cudagraph_batch_rows_equal_single_prompts(model) -> None:
    # the batching logic does not depend on how the matmuls are lowered: plain CUDA graphs
    # (quicker to compile), one decoder for the batch of 4 and one for every single prompt
    batch = generate_tokens(Decoder(model, compile=True, mode="reduce-overhead"), PROMPTS, 16)
    single = Decoder(model, compile=True, mode="reduce-overhead")
    alone = [generate_tokens(single, [p], 16)[0] for p in PROMPTS]
    assert batch == alone


def test_bf16_compiled_runs_and_stops(model) -> None:
    """bf16 (the benchmark's dtype): compiled decoding runs, and a stop token ends its row."""
    m16 = build_model(CFG, seed=0, device="cuda", dtype=torch.bfloat16).eval()
    dec = Decoder(m16, compile=True)
    free = generate_tokens(dec, PROMPTS, 20)
    assert all(len(o) == 20 for o in free)
    stop = free[0][5]
    got = generate_tokens(dec, PROMPTS, 20, stop_ids=[stop])
    assert got[0] == free[0][:free[0].index(stop) + 1]
