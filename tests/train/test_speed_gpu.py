"""The speed options on CUDA: varlen flash attention on packed rows == the dense mask and == the
padded rows; Inductor-compiled blocks == eager; selective checkpointing keeps less than no
checkpointing and more than full checkpointing, with the same gradients."""

from __future__ import annotations

import functools

import pytest
import torch

from solotune.attention import Varlen, varlen_available
from solotune.config import ModelConfig
from solotune.data import IGNORE_INDEX, Example
from solotune.data.batch import collate_batch
from solotune.data.packing import pack_window
from solotune.model import build_model, document_mask
from solotune.train.loss import full_logits_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CFG = ModelConfig(name="gpu-speed", dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=512,
                  max_seq_len=256)


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Example(ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3:])
            for n in lengths for ids in [torch.randint(3, 512, (n,), generator=g).tolist()]]


def _window(model, batches):
    model.zero_grad()
    n = sum(b.num_targets for b in batches)
    total = 0.0
    for b in batches:
        b = b.to("cuda")
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(b, head=functools.partial(full_logits_loss, labels=b.labels))
        (loss / n).backward()
        total += float(loss)
    return total / n, {k: p.grad.float().clone() for k, p in model.named_parameters()}


def _close(a, b, tol):
    for k in a:
        err = (a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)
        assert err < tol, (k, float(err))


@pytest.mark.skipif(not varlen_available(torch.device("cuda")), reason="torch without varlen attention")
def test_varlen_packed_equals_dense_mask_and_padded():
    model = build_model(CFG, dtype=torch.float32, device="cuda", seed=0)
    ex = _examples([100, 30, 77, 120, 20, 60, 90, 12])
    packed = pack_window(ex, row_len=256, rows_per_batch=2, pad_id=0)
    padded = [collate_batch(ex[i:i + 2], pad_id=0) for i in range(0, 8, 2)]
    assert any(b.packed for b in packed)
    loss_pad, g_pad = _window(model, padded)
    loss_var, g_var = _window(model, packed)  # Varlen on CUDA
    import solotune.model as m

    dense = lambda batch, device: document_mask(batch.seq_lens, batch.input_ids.shape[1], device)
    orig, m.packed_attention = m.packed_attention, dense
    try:
        loss_dense, g_dense = _window(model, packed)
    finally:
        m.packed_attention = orig
    assert abs(loss_var - loss_pad) < 2e-2 and abs(loss_var - loss_dense) < 2e-2
    _close(g_var, g_dense, 3e-2)
    _close(g_var, g_pad, 3e-2)


def test_inductor_blocks_equal_eager():
    model = build_model(CFG, dtype=torch.float32, device="cuda", seed=0)
    batches = pack_window(_examples([100, 30, 77, 120, 20, 60]), row_len=256, rows_per_batch=2, pad_id=0)
    loss_e, g_e = _window(model, batches)
    torch._dynamo.reset()
    model.compile_blocks()
    loss_c, g_c = _window(model, batches)
    assert abs(loss_c - loss_e) < 1e-2
    _close(g_c, g_e, 2e-2)


def test_selective_checkpointing_memory_between_off_and_all():
    model = build_model(CFG.replace(n_layers=4), dtype=torch.bfloat16, device="cuda", seed=0)
    model.train()
    batch = collate_batch(_examples([256] * 8), pad_id=0).to("cuda")
    out = {}
    for policy in ("off", "selective", "all"):
        model.set_grad_checkpointing(policy)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        loss = model(batch, head=functools.partial(full_logits_loss, labels=batch.labels))
        out[policy] = torch.cuda.memory_allocated() - base  # what the forward leaves for backward
        loss.backward()
        out[policy + "-grads"] = {k: p.grad.float().clone() for k, p in model.named_parameters()}
        del loss
    assert out["all"] < out["selective"] < out["off"], {k: v for k, v in out.items() if isinstance(v, int)}
    _close(out["selective-grads"], out["off-grads"], 1e-2)
