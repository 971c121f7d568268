"""train/graphs.py: with graph replay on, each micro-batch gets gradients in place before its forward
and updates zero them instead of freeing them; with it off, nothing changes. (The GPU test that the
replayed run's gradients equal the plain compiled run's: tests/train/test_train_gpu.py.)"""

from __future__ import annotations

import torch

from solotune.train.config import TrainConfig
from solotune.train.graphs import NO_GRAPHS, GraphSteps


def test_replay_materialises_zero_gradients_and_keeps_them():
    w = torch.nn.Parameter(torch.ones(3, 2))
    frozen = torch.ones(2)
    steps = GraphSteps([w], replay=True)
    steps.before_forward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros(3, 2))
    (w * 2).sum().backward()
    kept = w.grad
    steps.before_forward()  # the next micro-batch: the accumulated gradient stays
    assert w.grad is kept and torch.equal(w.grad, torch.full((3, 2), 2.0))
    assert steps.grads_to_none is False and frozen.grad is None


def test_without_replay_nothing_is_touched():
    w = torch.nn.Parameter(torch.ones(2))
    GraphSteps([w], replay=False).before_forward()
    NO_GRAPHS.before_forward()
    assert w.grad is None and NO_GRAPHS.grads_to_none and GraphSteps([w], replay=False).grads_to_none


def test_only_cuda_graph_compiles_replay_on_cuda():
    cfg = TrainConfig(model="tiny", compile="blocks-cudagraphs")
    assert cfg.replays_graphs("cuda") and not cfg.replays_graphs("cpu")
    assert not TrainConfig(model="tiny", compile="blocks").replays_graphs("cuda")


def test_no_grad_passes_run_the_compiled_code_eagerly_while_graphs_replay():
    import pytest

    if not hasattr(torch.compiler, "set_stance"):
        pytest.skip("torch < 2.6: no compiler stance")
    traced = []

    def backend(gm, example_inputs):
        traced.append(gm)
        return gm.forward

    f = torch.compile(lambda x: x * 2 + 1, backend=backend)
    x = torch.ones(3)
    run = lambda: f(x)  # noqa: E731
    assert torch.equal(GraphSteps([], replay=True).outside(run)(), x * 2 + 1) and not traced
    assert GraphSteps([], replay=False).outside(run) is run
    run()
    assert traced  # outside the wrapper the compiled code runs


def test_auto_replays_graphs_only_for_small_plain_micro_batches_on_cuda(monkeypatch):
    import importlib.util

    from solotune.train.config import GRAPH_MAX_TOKENS

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "triton" else real_find_spec(n, *a))
    course = TrainConfig(model="tiny", batch_size=1, max_seq_len=512)
    assert course.compile_mode("cuda") == "blocks-cudagraphs" and course.replays_graphs("cuda")
    assert course.compile_options("cuda") == {"mode": "reduce-overhead"}
    assert course.compile_mode("cpu") == "off" and course.compile_options("cpu") == {}
    big = course.replace(batch_size=GRAPH_MAX_TOKENS // 512 + 1)
    assert big.compile_mode("cuda") == "blocks" and big.compile_options("cuda") == {}
    for untried in (dict(grad_checkpoint="all"), dict(quantize="nf4"), dict(offload="activations"),
                    dict(optimizer_in_backward=True, grad_accum=1, max_grad_norm=None)):
        assert course.replace(**untried).compile_mode("cuda") == "blocks", untried
    assert course.replace(compile="blocks").compile_mode("cuda") == "blocks"
    assert course.replace(compile="off").compile_mode("cuda") == "off"
    assert course.replace(distributed="fsdp").compile_mode("cuda") == "off"
