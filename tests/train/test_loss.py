"""The chunked and fused linear-cross-entropy losses == the reference ``full_logits_loss``: the loss
and the gradients w.r.t. the hidden states and the head weight, exactly in fp64 and within bf16's
rounding under bf16 autocast; ignored targets, a chunk size that does not divide the tokens, a
frozen head (LoRA), a tied embedding head, and the whole model through ``model(batch, head=...)``."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

from solotune.config import ModelConfig
from solotune.data import IGNORE_INDEX
from solotune.data.batch import Batch
from solotune.model import build_model
from solotune.train.loss import LOSSES, chunked_loss, full_logits_loss, fused_linear_ce_loss, get_loss

NEW = {"chunked": chunked_loss, "fused-linear-ce": fused_linear_ce_loss}
BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits


def _case(dtype: torch.dtype, B: int = 3, T: int = 11, C: int = 16, V: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, dtype=torch.float64).to(dtype)
    head = nn.Linear(C, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, C, generator=g, dtype=torch.float64) * 0.3)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[-1, 7:] = IGNORE_INDEX  # padding
    return hidden, head, labels


def _loss_and_grads(fn, hidden, head, labels, autocast: torch.dtype | None = None):
    hidden = hidden.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = fn(hidden, head, labels)
    loss.backward()
    return loss.detach(), hidden.grad, None if head.weight.grad is None else head.weight.grad.clone()


def test_registered():
    assert set(NEW) <= set(LOSSES)
    for name, fn in NEW.items():
        assert get_loss(name) is fn


@pytest.mark.parametrize("name", list(NEW))
@pytest.mark.parametrize("chunk", [4, 7, 1024])  # several chunks, a ragged last chunk, one chunk
def test_fp64_exact(name, chunk):
    hidden, head, labels = _case(torch.float64)
    ref = _loss_and_grads(full_logits_loss, hidden, head, labels)
    got = _loss_and_grads(functools.partial(NEW[name], chunk_tokens=chunk), hidden, head, labels)
    assert got[0].dtype == torch.float64
    for r, x in zip(ref, got):
        torch.testing.assert_close(x, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(NEW))
def test_frozen_head_gets_no_gradient(name):
    hidden, head, labels = _case(torch.float64)
    head.requires_grad_(False)
    ref = _loss_and_grads(full_logits_loss, hidden, head, labels)
    got = _loss_and_grads(functools.partial(NEW[name], chunk_tokens=5), hidden, head, labels)
    assert got[2] is None
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(NEW))
def test_bf16_autocast_within_rounding(name):
    """fp32 weights and hidden states under bf16 autocast (the bf16-amp policy): the logits are
    the same bf16 matmul outputs, so the fp32 loss agrees to fp32 summation order; the gradients go
    through bf16 matmuls in both, rounded at different points (the reference scales d(logits)
    before its bf16 cast, the fused loss after; the fused weight gradient sums per-chunk bf16
    products in fp32): a few bf16 roundings, bounded by 4 eps in relative norm."""
    hidden, head, labels = _case(torch.float32, B=4, T=33, C=32, V=300)
    ref = _loss_and_grads(full_logits_loss, hidden, head, labels, autocast=torch.bfloat16)
    got = _loss_and_grads(functools.partial(NEW[name], chunk_tokens=40), hidden, head, labels, autocast=torch.bfloat16)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)
    for r, x in zip(ref[1:], got[1:]):
        assert ((x - r).norm() / r.norm()).item() <= 4 * BF16_EPS


@pytest.mark.parametrize("name", list(NEW))
def test_bf16_weights_without_autocast(name):
    """The pure-bf16 policy: bf16 hidden and weight, no autocast; gradients come back in bf16."""
    hidden, head, labels = _case(torch.bfloat16, B=2, T=20, C=32, V=200)
    ref = _loss_and_grads(full_logits_loss, hidden, head, labels)
    got = _loss_and_grads(functools.partial(NEW[name], chunk_tokens=16), hidden, head, labels)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)
    for r, x in zip(ref[1:], got[1:]):
        assert ((x.float() - r.float()).norm() / r.float().norm()).item() <= 4 * BF16_EPS


@pytest.mark.parametrize("name", list(NEW))
def test_no_targets_is_zero(name):
    hidden, head, labels = _case(torch.float64)
    labels.fill_(IGNORE_INDEX)
    loss, gh, gw = _loss_and_grads(functools.partial(NEW[name], chunk_tokens=8), hidden, head, labels)
    assert loss.item() == 0.0 and gh.abs().max().item() == 0.0 and gw.abs().max().item() == 0.0


def test_no_grad_mode_keeps_no_gradients():
    """Evaluation: under no_grad the fused loss computes only the loss (nothing is kept)."""
    hidden, head, labels = _case(torch.float64)
    with torch.no_grad():
        got = fused_linear_ce_loss(hidden.requires_grad_(True), head, labels, chunk_tokens=5)
    torch.testing.assert_close(got, full_logits_loss(hidden.detach(), head, labels).detach(), rtol=1e-12, atol=0)
    assert got.grad_fn is None


@pytest.mark.parametrize("name", list(NEW))
@pytest.mark.parametrize("tied", [False, True])
def test_whole_model_fp64(name, tied):
    """Through ``model(batch, head=...)``, every parameter trainable (the tied head's gradient adds
    to the embedding's, as in SmolLM2), packed rows included."""
    cfg = ModelConfig(name="t", dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48,
                      max_seq_len=64, tie_embeddings=tied)
    model = build_model(cfg, dtype=torch.float64, seed=0).requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    batch = Batch(input_ids=ids, labels=labels, positions=torch.arange(12).expand(2, 12).contiguous(),
                  seq_lens=((12,), (5, 7)))

    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss = model(batch, head=functools.partial(fn, labels=batch.labels))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = grads(full_logits_loss)
    loss, got = grads(functools.partial(NEW[name], chunk_tokens=5))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_compiled_full_logits_equals_eager(autocast):
    """``get_loss(compiled=True)``: the graph dynamo captures (aot_eager on CPU; Inductor on the GPU
    in tests/kernels/test_kernels_gpu.py) gives the eager loss and gradients, also under autocast."""
    torch._dynamo.reset()
    hidden, head, labels = _case(torch.float32)
    head.weight.requires_grad_(True)
    ref = _loss_and_grads(full_logits_loss, hidden, head, labels, autocast)
    compiled = get_loss("full-logits", compiled=True, backend="aot_eager", fullgraph=True)
    assert compiled is not full_logits_loss
    got = _loss_and_grads(compiled, hidden, head, labels, autocast)
    for r, x in zip(ref, got):
        torch.testing.assert_close(x, r, rtol=1e-6, atol=1e-6)


def test_only_full_logits_is_compiled():
    for name in ("chunked", "fused-linear-ce"):
        assert get_loss(name, compiled=True) is LOSSES[name]  # Python loops over chunks: kept eager
    assert get_loss("full-logits", compiled=False) is full_logits_loss


def test_fused_loss_holds_one_chunk_of_logits_at_a_time():
    """The fused loss's transient is one chunk's [n, V]: its 16-bit matmul output then the fp32 logits
    (turned into the softmax in place) and the 16-bit gradient copy — 6 bytes per logit of one chunk,
    not two chunks' worth (the previous chunk's tensors are dropped before the next is made)."""
    from solotune.bench.dryrun import _LiveBytes

    n, C, V, chunk = 4096, 64, 2048, 1024
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, C, generator=g).bfloat16().requires_grad_(True)
    head = torch.nn.Linear(C, V, bias=False).bfloat16().requires_grad_(False)  # a frozen head, as under LoRA
    labels = torch.randint(0, V, (1, n), generator=g)
    h3 = hidden[None]  # made outside the meter: the input is not the loss's
    meter = _LiveBytes()
    with meter:
        fused_linear_ce_loss(h3, head, labels, chunk_tokens=chunk)
    kept = n * C * 2  # d hidden, saved for backward
    logits = chunk * V
    assert meter.peak <= kept + 6 * logits + 2 * chunk * C * 2 + 64 * chunk * 4, meter.peak
    assert meter.peak >= kept + 6 * logits  # and the bound is tight: one chunk does live at once


def _fused_case(device: str, n: int = 4096, C: int = 64, V: int = 2048):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(1, n, C, generator=g, device=device).bfloat16().requires_grad_(True)
    head = torch.nn.Linear(C, V, bias=False, device=device).bfloat16().requires_grad_(False)  # frozen, as under LoRA
    labels = torch.randint(0, V, (1, n), generator=g, device=device)
    return hidden, head, labels


def test_fused_loss_runs_no_op_with_a_hidden_logits_temporary():
    """The meter above sees each op's outputs only: an op that makes an [n, V] temporary inside its kernel
    (``torch.logsumexp``: exp(x - max) before the sum) would be 2 more bytes per logit on the GPU, unseen. The
    fused loss runs logsumexp's steps itself, in place, so the meter's 6 bytes per logit are the real peak
    (checked on CUDA by test_cuda_fused_loss_peak_is_six_bytes_per_logit)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    hidden, head, labels = _fused_case("cpu", n=64, C=16, V=128)
    ops = Ops()
    with ops:
        loss = fused_linear_ce_loss(hidden, head, labels, chunk_tokens=32)
    assert {"mm", "amax", "exp_", "sum"} <= ops.seen  # the mode sees the loss's ops
    assert "logsumexp" not in ops.seen
    with torch.no_grad():
        ref = full_logits_loss(hidden.float(), head.float(), labels)
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fused_loss_peak_is_six_bytes_per_logit():
    """On the GPU's allocator, the fused loss's forward (which makes its gradients) peaks at one chunk's
    16-bit matmul output + fp32 logits (6 bytes per logit) above d hidden, as the planner counts it — not
    8 (a logsumexp temporary)."""
    n, C, V, chunk = 4096, 64, 32000, 1024
    hidden, head, labels = _fused_case("cuda", n, C, V)
    fused_linear_ce_loss(hidden, head, labels, chunk_tokens=chunk)  # cuBLAS workspaces made outside the peak
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fused_linear_ce_loss(hidden, head, labels, chunk_tokens=chunk)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    kept, logits = n * C * 2, chunk * V
    # Beside the 6 B per logit, while they live: one chunk's d hidden out of the matmul and the
    # workspace cuBLASLt gets from the caching allocator for that call (1 MiB by default; the first
    # H200 run of this test peaked 1.18 MiB above the 6 bytes). 8 B per logit would be 64 MiB more.
    matmul = chunk * C * 2 + (4 << 20)
    assert 6 * logits <= peak <= kept + 6 * logits + matmul, (peak, logits)
    del loss
